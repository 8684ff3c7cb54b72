"""EXL2 checkpoints as exllamav2 writes and reads them: mixed bit widths along one matrix.

Read from exllamav2 (turboderp-org/exllamav2, commit da07fac): ``conversion/adaptivegptq.py``
(``AdaptiveQuantizer.find_params``, ``AdaptiveGPTQ.pack``), ``exllamav2_ext/cuda/pack_tensor.cu``
(``pack_rows_4_kernel``, ``pack_columns_kernel``), ``exllamav2_ext/cuda/quantize.cu``
(``quantize_rtn_kernel``), ``exllamav2_ext/cuda/q_matrix.cu`` (``QMatrix`` constructor, ``shuffle_kernel``,
``reconstruct_kernel``), ``exllamav2_ext/cuda/quant/qdq_util.cuh`` (``dq_scale``), ``qdq_{2..8}.cuh``,
``module.py`` (``load_weight``), ``ext.py`` (``make_q_matrix``, ``make_group_map_py``), ``linear.py``
(``pad32``), ``config.py`` (tensor files), ``conversion/compile.py`` (config signature),
``conversion/measure.py`` (measurement.json), ``conversion/qparams.py`` (bit mixes, head options).

A quantized linear ``<prefix>`` with ``W [out, in]`` (torch's layout; exllamav2 calls the inputs
"rows" and the outputs "columns") is stored instead of ``<prefix>.weight`` as:

  ``q_invperm``   int32 ``[in]``       argsort of the act-order permutation ``perm`` (inputs by
                                       descending Hessian diagonal); exllamav2 loads it, derives
                                       ``q_perm = argsort(q_invperm)`` and reads both as uint16, so
                                       ``in <= 65536``. Stored row ``j`` is input ``q_perm[j]``. A
                                       ``q_perm`` tensor, where a file has one, is ignored there.
  ``q_groups``    int16 ``[2*groups]`` per group ``(bits, first q_weight row)``; a group's input rows
                                       are ``(next first row - first row) * 32 / bits``, the last
                                       group takes the inputs left. Groups run from the widest to
                                       the narrowest bit width: the kernels (``shuffle_kernel``,
                                       ``reconstruct_kernel``) read all 8-bit rows, then 6, 5, 4, 3,
                                       2, stepping 32 rows (16 for 2-bit), so group sizes are
                                       multiples of 32 (16 at 2 bits). tessera reads any order
                                       and size (the meaning is the same) but writes only these.
  ``q_weight``    int32 ``[rows, out]`` each group's integers along its stored input rows, one
                                       little-endian bit stream per output column starting at a
                                       fresh word (``pack_columns_kernel``): ``bits`` words hold
                                       32 values (3, 5, 6 bits straddle words).
  ``q_scale``     int32 ``[groups, out/8]`` 4-bit scale levels, 8 output columns per word, column
                                       ``c`` in bits ``4*(c%8)``, stored as ``level - 1`` (levels
                                       1..16; ``pack_rows_4_kernel``).
  ``q_scale_max`` float16 ``[groups]``  the group's largest scale.
  ``bias``        float16 ``[out]``     optional, an ordinary tensor beside them.

A weight is ``W[:, q_perm[j]] = scale * (q[j] - 2**(bits-1))`` with ``q`` in ``0..2**bits-1``
(``quantize_rtn_kernel``: ``clamp(rint(x / scale) + 2**(bits-1), 0, 2**bits - 1)``) and the scale
computed in fp16 exactly as ``dq_scale`` does after ``make_q_matrix`` divides ``q_scale_max`` by
256: ``scale = fp16(fp16(level**2) * fp16(q_scale_max / 256))``. ``find_params`` picks levels as
``round(16 * sqrt(scale / max_scale))`` (so the largest scale is level 16) and stores
``max_scale`` scaled by its search factor; fp16 rounding of ``q_scale_max / 256`` (subnormal for
``q_scale_max`` under 2**-6) is part of the format. The kernels multiply ``fp16(q - zero)`` by
that scale in fp16; the float32 product is exact, so ``dequantize(torch.float16)`` equals them.

exllamav2 holds an MLP reordered (``ExLlamaV2MLP.load``, mlp.py lines 161-163): down_proj is
loaded without its permutation (rows in stored order) and gate_proj/up_proj with their output
columns permuted by it (``tensor_remap``), the same product; so ``get_weight_tensor_dq`` of those
three is a permutation of the stored weight, the other linears' is the weight itself
(packages/formats/tests/exllamav2_ref.py ports that load and the reconstruct kernel).

exllamav2 pads ``out`` to a multiple of 32 (``pad32``; q_weight and q_scale then carry the padded
columns): tessera takes q_weight's columns as the outputs and writes only outputs that need no
padding. The lm_head is quantized like any linear
at ``head_bits`` (``qparams_headoptions``: 2, 3, 4, 5, 6 or 8 bits, e.g. 6-bit groups then 4-bit
ones for ``head_bits`` 4). The converter's full output (``-cf``) signs config.json with
``quantization_config = {"quant_method": "exl2", "version", "bits" (target bits per weight of the
decoder), "head_bits", "calibration": {"rows", "length", "dataset"}}`` and writes
``measurement.json`` ``{"measurement": {"<module>.<mode>": [{"accuracy", "total_bits", "<linear>":
{"group_size", "bits", "bits_prop", "scale_bits"}}, ...]}, "last_module_idx"}``. exllamav2 finds
its weights as every ``*.safetensors`` in the folder and recognises EXL2 by ``.q_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from .config_values import shown
from .errors import FormatError
from .gptq import unpack_rows
from .grouped import GroupQuant

EXL2_BITS = (2, 3, 4, 5, 6, 8)
REQUIRED_PARTS = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
PARTS = (*REQUIRED_PARTS, "q_perm")
_DTYPES = {
    "q_weight": torch.int32,
    "q_scale": torch.int32,
    "q_scale_max": torch.float16,
    "q_groups": torch.int16,
    "q_invperm": torch.int32,
    "q_perm": torch.int32,
}
_DIMS = {"q_weight": 2, "q_scale": 2, "q_scale_max": 1, "q_groups": 1, "q_invperm": 1, "q_perm": 1}
MAX_INPUTS = 65536  # q_perm and q_invperm are read as uint16


def group_step(bits: int) -> int:
    """The multiple of input rows a group of ``bits`` must span for exllamav2's kernels."""
    return 16 if bits == 2 else 32


def exl2_scale(levels: torch.Tensor, q_scale_max: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, groups]`` scales from levels 1..16 ``[out, groups]`` and float16
    ``q_scale_max [groups]``, rounded in fp16 at each step as exllamav2's ``dq_scale``."""
    max_scale = q_scale_max.to(torch.float16) / 256
    return ((levels.long() ** 2).to(torch.float16) * max_scale).float()


def _unpack_levels(q_scale: torch.Tensor, n_out: int) -> torch.Tensor:
    """int32 ``[groups, out/8]`` -> int64 levels ``[groups, out]`` in 1..16."""
    shifts = torch.arange(8, device=q_scale.device) * 4
    nib = ((q_scale.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> shifts) & 0xF
    return nib.reshape(q_scale.shape[0], -1)[:, :n_out] + 1


@dataclass(frozen=True)
class EXL2Config:
    """config.json's ``quantization_config`` as exllamav2 signs it; None fields were absent (a
    folder converted without ``-cf`` has no signature: its tensors alone say EXL2)."""

    bits: float | None = None  # target bits per weight of the decoder layers
    head_bits: int | None = None
    calibration: dict | None = None  # rows, length, dataset
    version: str | None = None
    quant_method: str = "exl2"


def exl2_config_from_hf(cfg: dict, source) -> EXL2Config:
    """EXL2Config from config.json's ``quantization_config``; a bad field is a FormatError."""
    where = f"{source}: quantization_config"
    if not isinstance(cfg, dict):
        raise FormatError(f"{where} is {shown(cfg)}, not an object")
    if cfg.get("quant_method") != "exl2":
        raise FormatError(f"{where}.quant_method is {shown(cfg.get('quant_method'))}, not 'exl2'")
    bits = cfg.get("bits")
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 1 < bits <= 8
    ):
        raise FormatError(f"{where}.bits is {shown(bits)}, not a bits-per-weight between 1 and 8")
    head = cfg.get("head_bits")
    if head is not None and (isinstance(head, bool) or head not in EXL2_BITS):  # convert_exl2.py's check
        raise FormatError(f"{where}.head_bits is {shown(head)}, not one of {', '.join(map(str, EXL2_BITS))}")
    cal = cfg.get("calibration")
    if cal is not None:
        if not isinstance(cal, dict):
            raise FormatError(f"{where}.calibration is {shown(cal)}, not an object")
        for key in ("rows", "length"):
            v = cal.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise FormatError(f"{where}.calibration.{key} is {shown(v)}, not a count")
        if not isinstance(cal.get("dataset", ""), str):
            raise FormatError(f"{where}.calibration.dataset is {shown(cal['dataset'])}, not a string")
    version = cfg.get("version")
    if version is not None and not isinstance(version, str):
        raise FormatError(f"{where}.version is {shown(version)}, not a string")
    return EXL2Config(None if bits is None else float(bits), head, cal, version)


@dataclass(frozen=True)
class EXL2Tensor:
    """An EXL2 linear weight kept as stored; ``shape`` is torch's ``(out, in)``; the group layout
    (input starts in stored order, bit widths, first q_weight row of each) is read from q_groups."""

    q_weight: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    q_invperm: torch.Tensor
    shape: tuple[int, int]
    group_starts: tuple[int, ...]
    group_bits: tuple[int, ...]
    word_starts: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.q_weight.device

    @property
    def nbytes(self) -> int:
        parts = (self.q_weight, self.q_scale, self.q_scale_max, self.q_groups, self.q_invperm)
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales and permutation included (as exllamav2 counts them)."""
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])

    def to(self, device: torch.device | str) -> EXL2Tensor:
        return EXL2Tensor(
            self.q_weight.to(device), self.q_scale.to(device), self.q_scale_max.to(device),
            self.q_groups.to(device), self.q_invperm.to(device), self.shape, self.group_starts,
            self.group_bits, self.word_starts,
        )  # fmt: skip

    def int_weight(self) -> torch.Tensor:
        """The integers as uint8 ``[in, out]`` in stored (permuted) input order."""
        words = (*self.word_starts, self.q_weight.shape[0])
        parts = []
        for i, (a, b) in enumerate(pairwise(self.group_starts)):
            packed = self.q_weight[words[i] : words[i + 1]]
            parts.append(unpack_rows(packed, self.group_bits[i])[: b - a])
        return torch.cat(parts)

    def scales(self) -> torch.Tensor:
        """float32 ``[out, groups]``, exactly the fp16 values exllamav2's kernels multiply by."""
        levels = _unpack_levels(self.q_scale, self.shape[0])
        return exl2_scale(levels.T, self.q_scale_max)

    def as_groups(self) -> GroupQuant:
        """The weight as a GroupQuant: stored order, ``perm = argsort(q_invperm)``, zero 2**(b-1)."""
        n_out = self.shape[0]
        zero = torch.tensor([2.0 ** (b - 1) for b in self.group_bits], device=self.device)
        perm = torch.argsort(self.q_invperm.long())
        return GroupQuant(
            self.shape, self.int_weight().T.to(torch.uint8).contiguous(), self.scales(),
            zero.expand(n_out, -1).contiguous(), self.group_starts, self.group_bits, perm,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` in ``dtype``: ``scale * (q - 2**(b-1))`` in float32 (exact for fp16)."""
        return self.as_groups().dequantize(dtype)


def check_exl2_headers(prefix: str, shapes: dict, dtypes: dict, source) -> tuple[int, int, int]:
    """``(out, in, groups)`` of the EXL2 linear ``prefix`` from its parts' header shapes and
    dtypes, each part checked against the others."""

    def bad(part: str, field: str, got, want: str):
        return FormatError(f"{source}: tensor {prefix}.{part} has {field} {got}, expected {want}")

    for part in REQUIRED_PARTS:
        if part not in shapes:
            raise FormatError(f"{source}: tensor {prefix}.{part} is missing ({prefix}.q_weight is present)")
    for part, shape in shapes.items():
        if dtypes[part] != _DTYPES[part]:
            raise bad(part, "dtype", dtypes[part], str(_DTYPES[part]).removeprefix("torch."))
        if len(shape) != _DIMS[part] or 0 in shape:
            raise bad(part, "shape", list(shape), f"{_DIMS[part]} non-empty dimensions")
    words, n_out = shapes["q_weight"]
    (groups,) = shapes["q_scale_max"]
    (n_in,) = shapes["q_invperm"]
    if n_in > MAX_INPUTS:
        raise bad("q_invperm", "shape", [n_in], f"at most {MAX_INPUTS} inputs (read as uint16)")
    if "q_perm" in shapes and list(shapes["q_perm"]) != [n_in]:
        raise bad("q_perm", "shape", list(shapes["q_perm"]), f"[{n_in}] like q_invperm")
    if n_out % 8 or list(shapes["q_scale"]) != [groups, n_out // 8]:
        want = f"[{groups}, {n_out}/8] (q_scale_max's groups, q_weight's outputs / 8)"
        raise bad("q_scale", "shape", list(shapes["q_scale"]), want)
    if list(shapes["q_groups"]) != [2 * groups]:
        raise bad("q_groups", "shape", list(shapes["q_groups"]), f"[{2 * groups}] (2 per group)")
    if words > -(-n_in // 4):  # 8 bits is the widest: one word per 4 inputs
        raise bad("q_weight", "shape", [words, n_out], f"at most {-(-n_in // 4)} rows for {n_in} inputs")
    return n_out, n_in, groups


def read_group_layout(prefix: str, q_groups: torch.Tensor, words: int, n_in: int, source):
    """``(group_starts, group_bits, word_starts)`` from q_groups, checked against q_weight's
    ``words`` rows and the ``n_in`` inputs. Groups out of exllamav2's kernel order (widest first,
    multiples of 32 rows) still have one meaning and are read; ``exl2_parts`` never writes them."""

    def bad(what: str):
        return FormatError(f"{source}: tensor {prefix}.q_groups {what}")

    g = [int(v) for v in q_groups.tolist()]
    bits, word_starts = g[0::2], g[1::2]
    for i, b in enumerate(bits):
        if b not in EXL2_BITS:
            raise bad(f"gives group {i} {b} bits (EXL2 has {', '.join(map(str, EXL2_BITS))})")
    if word_starts[0] != 0:
        raise bad(f"starts group 0 at q_weight row {word_starts[0]}, not 0")
    ends = [*word_starts[1:], words]
    starts = [0]
    for i, (a, b) in enumerate(zip(word_starts, ends, strict=True)):
        last = i == len(bits) - 1
        if b <= a or (not last and (b - a) * 32 % bits[i]):
            raise bad(
                f"gives group {i} q_weight rows {a}..{b}, not whole {bits[i]}-bit values "
                f"(q_weight has {words} rows)"
            )
        rows = n_in - starts[-1] if last else (b - a) * 32 // bits[i]
        if rows <= 0 or starts[-1] + rows > n_in or (last and -(-rows * bits[i] // 32) != b - a):
            raise bad(
                f"does not cut the {n_in} inputs (q_invperm) into groups filling q_weight's {words} rows "
                f"(group {i}: {bits[i]} bits, rows {a}..{b})"
            )
        starts.append(starts[-1] + rows)
    return tuple(starts), tuple(bits), tuple(word_starts)


def check_perm(prefix: str, q_invperm: torch.Tensor, q_perm: torch.Tensor | None, source) -> None:
    """q_invperm is a permutation of the inputs, and q_perm (if stored) its inverse."""
    n = q_invperm.numel()
    v = q_invperm.long()
    lo, hi = int(v.min()), int(v.max())
    if lo < 0 or hi >= n:
        raise FormatError(
            f"{source}: tensor {prefix}.q_invperm holds {lo if lo < 0 else hi}, outside 0..{n - 1}"
        )
    counts = torch.bincount(v, minlength=n)
    if bool((counts != 1).any()):
        dup = int(torch.nonzero(counts > 1)[0])
        raise FormatError(f"{source}: tensor {prefix}.q_invperm is not a permutation ({dup} repeats)")
    if q_perm is not None and not torch.equal(q_perm.long(), torch.argsort(v)):
        raise FormatError(f"{source}: tensor {prefix}.q_perm is not the inverse of {prefix}.q_invperm")


def check_scale_max(prefix: str, q_scale_max: torch.Tensor, source) -> None:
    if not bool(q_scale_max.isfinite().all()):
        raise FormatError(f"{source}: tensor {prefix}.q_scale_max holds a value that is not finite")


def exl2_tensor(prefix: str, parts: dict[str, torch.Tensor], source) -> EXL2Tensor:
    """The EXL2Tensor of the linear ``prefix`` from its stored parts, all checked."""
    shapes = {k: tuple(t.shape) for k, t in parts.items()}
    dtypes = {k: t.dtype for k, t in parts.items()}
    n_out, n_in, _ = check_exl2_headers(prefix, shapes, dtypes, source)
    layout = read_group_layout(prefix, parts["q_groups"], shapes["q_weight"][0], n_in, source)
    check_perm(prefix, parts["q_invperm"], parts.get("q_perm"), source)
    check_scale_max(prefix, parts["q_scale_max"], source)
    return EXL2Tensor(
        parts["q_weight"], parts["q_scale"], parts["q_scale_max"], parts["q_groups"], parts["q_invperm"],
        (n_out, n_in), *layout,
    )  # fmt: skip
