"""GPTQ and AWQ checkpoints as HF/optimum, GPTQModel and AutoAWQ write them.

A quantized linear ``<prefix>`` is stored as four tensors instead of ``<prefix>.weight``:

GPTQ (``quant_method: gptq``), for ``W [out, in]`` with ``bits`` b:
  ``qweight`` int32 ``[in*b/32, out]``  the integers along the *input* dim as one little-endian
                                        bit stream per column (b = 3 straddles 32-bit words:
                                        3 words hold 32 values)
  ``qzeros``  int32 ``[groups, out*b/32]`` zero points, the same bit stream along the outputs
  ``scales``  ``[groups, out]``
  ``g_idx``   int32 ``[in]``            the group of each input (act-order permutes it)
  ``W[o, i] = scales[g, o] * (q[i, o] - z[g, o])`` with ``g = g_idx[i]``; ``checkpoint_format``
  ``"gptq"`` (v1) stores ``z - 1``, ``"gptq_v2"`` stores ``z``.

AWQ GEMM (``quant_method: awq``, ``version: gemm``, 4 bits):
  ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[groups, out/8]`` pack 8 *output*
  columns per word in AWQ's interleaved order (nibble k holds column ``_AWQ_ORDER[k]``);
  ``scales [groups, out]``; no g_idx (input i is in group ``i // group_size``); zeros as stored.

Per-module settings, as GPTQModel writes them and vLLM reads them: ``dynamic`` maps a pattern to
overrides of ``bits`` / ``group_size`` / ``sym`` / ``desc_act`` for the modules it matches (a
``re.match`` of the HF module name, e.g. ``model.layers.3.mlp.down_proj`` or ``lm_head``; the first
pattern in the file's order that matches wins; ``"-:pattern"`` leaves those modules unquantized,
stored as a plain ``.weight``; ``"+:"`` or no prefix overrides). ``lm_head: true`` says the LM
head is quantized too (``lm_head.qweight`` ...; GPTQModel gives it 8 bits through ``dynamic``
unless told otherwise, and refuses a head tied to the embeddings). ``modules_to_not_convert``
(transformers, AutoAWQ) lists names whose modules stay unquantized (a module whose name contains
one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .config_values import shown
from .errors import FormatError

GPTQ_BITS = (2, 3, 4, 8)
PARTS = ("qweight", "qzeros", "scales", "g_idx")
# AWQ packs output columns 0, 2, 4, 6, 1, 3, 5, 7 into nibbles 0..7 of a word
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNORDER = tuple(_AWQ_ORDER.index(c) for c in range(8))  # column c sits in nibble _AWQ_UNORDER[c]
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GPTQConfig:
    """A checkpoint's quantization_config, checked. ``group_size`` -1 is one group per column."""

    quant_method: str  # "gptq" | "awq"
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str  # "gptq" (v1: zeros stored minus one) | "gptq_v2" | "gemm" (AWQ)
    lm_head: bool = False  # the LM head is quantized too
    # (pattern, skip, overrides) in the file's order: see the module doc
    dynamic: tuple[tuple[str, bool, tuple[tuple[str, int | bool], ...]], ...] = ()
    not_converted: tuple[str, ...] = ()  # modules_to_not_convert
    where: str = "quantization_config"  # where this module's settings come from, for errors

    def for_module(self, name: str) -> GPTQConfig | None:
        """The settings of the module ``name`` (HF name, no ``.weight``); None where it is left
        unquantized (``-:`` of ``dynamic``, ``modules_to_not_convert``, or the LM head without
        ``lm_head``)."""
        if any(key in name for key in self.not_converted) or (is_lm_head(name) and not self.lm_head):
            return None
        for pattern, skip, overrides in self.dynamic:
            if re.match(pattern, name):
                if skip:
                    return None
                where = f"quantization_config.dynamic[{pattern!r}]"
                return replace(self, **dict(overrides), dynamic=(), not_converted=(), where=where)
        return self

    def skipped_by(self, name: str) -> str:
        """Which field leaves ``name`` unquantized (for errors)."""
        if any(key in name for key in self.not_converted):
            return "quantization_config.modules_to_not_convert"
        if is_lm_head(name) and not self.lm_head:
            return "quantization_config.lm_head is false, which"
        for pattern, skip, _ in self.dynamic:
            if re.match(pattern, name):
                return f"quantization_config.dynamic[{('-:' if skip else '') + pattern!r}]"
        return "quantization_config"


def is_lm_head(name: str) -> bool:
    """The LM head's module (``lm_head``; ``language_model.lm_head`` in a VLM's checkpoint)."""
    return name.rpartition(".")[2] == "lm_head"


def quantization_config_from_hf(cfg: dict, source) -> GPTQConfig:
    """Our GPTQConfig from config.json's ``quantization_config``; anything we can't read exactly
    (another method, format, bit width, packing dtype, a per-module override of those) is a
    FormatError that names the field."""
    where = f"{source}: quantization_config"
    if not isinstance(cfg, dict):
        raise FormatError(f"{where} is {shown(cfg)}, not an object")
    method = cfg.get("quant_method")
    if method not in ("gptq", "awq"):
        raise FormatError(f"{where}.quant_method {shown(method)} is not supported (supported: gptq, awq)")

    def flag(key: str, default: bool) -> bool:
        return _flag(cfg.get(key), default, f"{where}.{key}")

    bits_key = "bits" if "bits" in cfg or method == "gptq" else "w_bit"
    bits = _bits(cfg.get(bits_key), method, f"{where}.{bits_key}")
    group_key = "group_size" if "group_size" in cfg or method == "gptq" else "q_group_size"
    group = _group_size(cfg.get(group_key, 128), f"{where}.{group_key}")
    pack = cfg.get("pack_dtype", "int32")
    if pack not in _INT32:
        raise FormatError(f"{where}.pack_dtype is {shown(pack)}, only int32 packing is supported")

    if method == "awq":
        version = cfg.get("version", "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise FormatError(
                f"{where}.version {shown(version)} is not supported (supported: gemm; GEMV and other "
                "AWQ layouts pack differently)"
            )
        # zero_point false (symmetric): GPTQModel still stores qzeros, all at the midpoint
        sym = not flag("zero_point", True)
        base = GPTQConfig("awq", bits, group, sym=sym, desc_act=False, checkpoint_format="gemm")
    else:
        fmt = cfg.get("checkpoint_format", cfg.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise FormatError(
                f"{where}.checkpoint_format {shown(fmt)} is not supported (supported: gptq, gptq_v2)"
            )
        base = GPTQConfig("gptq", bits, group, flag("sym", True), flag("desc_act", False), fmt)
    return replace(
        base,
        lm_head=flag("lm_head", False),
        dynamic=_dynamic_rules(cfg.get("dynamic"), base, where),
        not_converted=_not_converted(cfg.get("modules_to_not_convert"), where),
    )


_INT32 = ("int32", "torch.int32")


def _flag(value, default: bool, field: str) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FormatError(f"{field} is {shown(value)}, not true or false")
    return value


def _bits(value, method: str, field: str) -> int:
    allowed = GPTQ_BITS if method == "gptq" else (4,)
    if isinstance(value, bool) or value not in allowed:
        raise FormatError(f"{field} is {shown(value)}; {method} supports {', '.join(map(str, allowed))} bits")
    return value


def _group_size(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or 0 < value <= 2**20):
        raise FormatError(f"{field} is {shown(value)}, not a positive size or -1")
    if value != -1 and value & (value - 1):
        raise FormatError(f"{field} is {value}, not a power of two or -1")
    return value


def _dynamic_rules(dynamic, base: GPTQConfig, where: str) -> tuple:
    """``dynamic``'s rules, each checked as the file-wide fields are. An override may change
    bits, group_size, sym (AWQ: zero_point) and desc_act; GPTQModel's solver settings beside them
    (mse, damp_percent, ...) do not change how the tensors read and are passed over; a per-module
    packing, format or method other than the file's is refused."""
    if dynamic is None:
        return ()
    if not isinstance(dynamic, dict):
        raise FormatError(f"{where}.dynamic is {shown(dynamic)}, not an object of pattern -> overrides")
    same = {
        "pack_dtype": _INT32,
        "quant_method": (base.quant_method,),
        "method": (base.quant_method,),
        "format": (base.checkpoint_format,),
        "checkpoint_format": (base.checkpoint_format,),
    }
    rules = []
    for key, overrides in dynamic.items():
        at = f"{where}.dynamic[{key!r}]"
        skip = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise FormatError(f"{at}: {pattern!r} is not a regular expression ({e})") from e
        if not isinstance(overrides, dict):
            raise FormatError(f"{at} is {shown(overrides)}, not an object of overrides")
        for k, values in same.items():
            if k in overrides and overrides[k] not in values:
                raise FormatError(f"{at}.{k} is {shown(overrides[k])}: a per-module {k} is not supported")
        picked: dict[str, int | bool] = {}
        if "bits" in overrides:
            picked["bits"] = _bits(overrides["bits"], base.quant_method, f"{at}.bits")
        if "group_size" in overrides:
            picked["group_size"] = _group_size(overrides["group_size"], f"{at}.group_size")
        if "sym" in overrides:
            picked["sym"] = _flag(overrides["sym"], base.sym, f"{at}.sym")
        if "zero_point" in overrides:
            picked["sym"] = not _flag(overrides["zero_point"], not base.sym, f"{at}.zero_point")
        if "desc_act" in overrides:
            picked["desc_act"] = _flag(overrides["desc_act"], base.desc_act, f"{at}.desc_act")
            if picked["desc_act"] and base.quant_method == "awq":
                raise FormatError(f"{at}.desc_act is true, but AWQ has no act-order")
        rules.append((pattern, skip, () if skip else tuple(sorted(picked.items()))))
    return tuple(rules)


def _not_converted(names, where: str) -> tuple[str, ...]:
    if names is None:
        return ()
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise FormatError(f"{where}.modules_to_not_convert is {shown(names)}, not a list of module names")
    return tuple(names)


@dataclass(frozen=True)
class GPTQTensor:
    """A GPTQ or AWQ linear weight kept as stored; ``shape`` is torch's ``(out, in)``."""

    scheme: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: per output channel (one group spans all inputs)
    sym: bool
    desc_act: bool
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    shape: tuple[int, int]
    # added to each stored zero: 1 for GPTQ v1 checkpoints, per value as AutoGPTQ, ExLlamaV2 and
    # vLLM read them (a v1 zero of 0, stored as -1, reads as 2**bits there and here; GPTQModel
    # instead adds 1 to the whole packed word, carrying into the next value)
    zero_offset: int = 0

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        parts = (self.qweight, self.qzeros, self.scales, self.g_idx)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    def to(self, device: torch.device | str) -> GPTQTensor:
        g = None if self.g_idx is None else self.g_idx.to(device)
        return GPTQTensor(
            self.scheme, self.bits, self.group_size, self.sym, self.desc_act, self.qweight.to(device),
            self.qzeros.to(device), self.scales.to(device), g, self.shape, self.zero_offset,
        )  # fmt: skip

    def group_index(self) -> torch.Tensor:
        """The group of each input column (g_idx, or consecutive groups where there is none)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        n_in = self.shape[1]
        size = n_in if self.group_size == -1 else self.group_size
        return torch.arange(n_in, device=self.device) // size

    def int_weight(self) -> torch.Tensor:
        """The quantized integers as ``[in, out]`` uint8."""
        if self.scheme == "awq":
            return unpack_awq_cols(self.qweight, self.bits)
        return unpack_rows(self.qweight, self.bits)[: self.shape[1]]

    def int_zeros(self) -> torch.Tensor:
        """The zero points as ``[groups, out]`` int64 (v1's stored offset undone)."""
        if self.scheme == "awq":
            return unpack_awq_cols(self.qzeros, self.bits).to(torch.int64)
        return unpack_rows(self.qzeros.T, self.bits).T[:, : self.shape[0]].to(torch.int64) + self.zero_offset

    def as_groups(self):
        """The weight as a ``GroupQuant``: columns sorted by group (act-order's ``g_idx``
        becomes the stored-order permutation; none where the groups already run in order)."""
        from .grouped import GroupQuant

        n_out, n_in = self.shape
        g = self.group_index()
        perm = None
        if bool((g[1:] < g[:-1]).any()):
            perm = torch.sort(g, stable=True).indices
            g = g[perm]
        counts = torch.bincount(g, minlength=self.groups)
        used = torch.nonzero(counts).flatten()  # a group no input uses has no columns to store
        starts = [0, *torch.cumsum(counts[used], 0).tolist()]
        q = self.int_weight()
        if perm is not None:
            q = q[perm]
        return GroupQuant(
            (n_out, n_in), q.T.to(torch.uint8).contiguous(), self.scales.float().T[:, used].contiguous(),
            self.int_zeros().float().T[:, used].contiguous(), tuple(starts), (self.bits,) * len(used), perm,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[out, in]`` in ``dtype``: ``scale * (q - zero)`` computed in float32."""
        g = self.group_index()
        q = self.int_weight()
        z = self.int_zeros()[g]
        s = self.scales.float()[g]
        return ((q - z).float() * s).T.contiguous().to(dtype)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[rows, cols]`` holding, per column, a little-endian stream of ``bits``-bit values
    -> uint8 ``[rows*32/bits, cols]`` (a byte a value: an LM head's integers at load are its
    weight count in bytes, not eight times that). ``bits`` words hold 32 values, so 3-bit values
    straddle word boundaries (values 10 and 21 of each 3 words). Taken per position in those
    stripes of ``bits`` words: 32 whole-tensor shifts in int32, fast enough for an 8B model's
    matrices."""
    rows, cols = packed.shape
    words = packed.to(torch.int32)
    pad = -rows % bits  # 2/4/8 bits: words are independent, so pad to whole stripes of ``bits``
    if pad:
        words = torch.cat([words, words.new_zeros(pad, cols)])
    words = words.reshape(-1, bits, cols)
    out = torch.empty(words.shape[0], 32, cols, dtype=torch.uint8, device=packed.device)
    for j in range(32):
        word, off = divmod(j * bits, 32)
        v = words[:, word] >> off  # arithmetic: copies of the sign bit land above the value
        if off + bits > 32:  # the value's high bits open the next word
            v = (v & ((1 << (32 - off)) - 1)) | (words[:, word + 1] << (32 - off))
        out[:, j] = v & ((1 << bits) - 1)
    return out.reshape(-1, cols)[: rows * 32 // bits]


def unpack_awq_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[rows, cols*8]``-in-``[rows, cols]`` AWQ GEMM packing -> uint8 ``[rows, cols*8]``."""
    rows, cols = packed.shape
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    # int32 shifts copy the sign bit down; the mask keeps the value's own bits only
    nibbles = ((packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    order = torch.tensor(_AWQ_UNORDER, device=packed.device)
    return nibbles[:, :, order].reshape(rows, cols * per)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_gptq_shapes(prefix: str, shapes: dict, dtypes: dict, cfg: GPTQConfig, source) -> tuple[int, int]:
    """``(out, in)`` of the quantized linear ``prefix`` from its parts' shapes and dtypes (header
    data only), every part checked against the others and against ``cfg``."""

    def bad(part: str, field: str, got, want: str):
        said = "" if cfg.where == "quantization_config" else f", as {cfg.where} says"
        return FormatError(f"{source}: tensor {prefix}.{part} has {field} {got}, expected {want}{said}")

    for part in ("qweight", "qzeros", "scales"):
        if part not in shapes:
            raise FormatError(f"{source}: tensor {prefix}.{part} is missing ({prefix}.qweight is present)")
    for part, shape in shapes.items():
        if len(shape) != (1 if part == "g_idx" else 2):
            raise bad(part, "shape", list(shape), f"{1 if part == 'g_idx' else 2} dimensions")
    for part in ("qweight", "qzeros", "g_idx"):
        if part in dtypes and dtypes[part] != torch.int32:
            raise bad(part, "dtype", dtypes[part], "int32")
    if dtypes["scales"] not in _SCALE_DTYPES:
        raise bad("scales", "dtype", dtypes["scales"], "float16, bfloat16 or float32")
    b = cfg.bits
    qw, qz, sc = shapes["qweight"], shapes["qzeros"], shapes["scales"]
    if cfg.quant_method == "awq":
        if "g_idx" in shapes:
            raise FormatError(f"{source}: tensor {prefix}.g_idx is present, but AWQ checkpoints have none")
        n_in, n_out = qw[0], qw[1] * (32 // b)
    else:
        # a last word may be partly filled (2/4/8 bits), so g_idx, where present, tells the inputs
        n_in = shapes["g_idx"][0] if "g_idx" in shapes else qw[0] * 32 // b
        n_out = qw[1]
        if b == 3 and (n_in % 32 or n_out % 32):
            raise bad("qweight", "shape", list(qw), "3-bit features in multiples of 32 (3 words hold 32)")
        if qw[0] != _ceil_div(n_in * b, 32):
            want = f"[{_ceil_div(n_in * b, 32)}, {n_out}] for {n_in} inputs at bits={b}"
            raise bad("qweight", "shape", list(qw), want)
    if n_in == 0 or n_out == 0:
        raise bad("qweight", "shape", list(qw), "no empty dimension")
    size = n_in if cfg.group_size == -1 else cfg.group_size
    groups = _ceil_div(n_in, size)
    if cfg.desc_act and "g_idx" not in shapes:
        raise FormatError(f"{source}: tensor {prefix}.g_idx is missing, but desc_act is true")
    if list(sc) != [groups, n_out]:
        raise bad("scales", "shape", list(sc), f"[{groups}, {n_out}] (group_size={cfg.group_size})")
    if list(qz) != [groups, _ceil_div(n_out * b, 32)]:
        want = f"[{groups}, {_ceil_div(n_out * b, 32)}] (bits={b}, group_size={cfg.group_size})"
        raise bad("qzeros", "shape", list(qz), want)
    return n_out, n_in


def check_g_idx(prefix: str, g_idx: torch.Tensor, groups: int, cfg: GPTQConfig, source) -> None:
    """Every input's group is a group the scales have; without act-order they run in order."""
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= groups:
        bad = lo if lo < 0 else hi
        raise FormatError(
            f"{source}: tensor {prefix}.g_idx holds group {bad}, outside 0..{groups - 1} (the scales' groups)"
        )
    if not cfg.desc_act:
        size = g_idx.numel() if cfg.group_size == -1 else cfg.group_size
        if not torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // size):
            raise FormatError(
                f"{source}: tensor {prefix}.g_idx reorders the inputs but desc_act is false in {cfg.where}"
            )


def check_sym_zeros(prefix: str, qzeros: torch.Tensor, n_out: int, cfg: GPTQConfig, source) -> None:
    """A symmetric checkpoint's zero points all sit at the middle of the range."""
    if not cfg.sym:
        return
    mid = 1 << (cfg.bits - 1)
    if cfg.quant_method == "awq":
        stored, want, field = unpack_awq_cols(qzeros, cfg.bits), mid, "zero_point is false"
    else:
        stored = unpack_rows(qzeros.T, cfg.bits).T[:, :n_out]
        want = mid - 1 if cfg.checkpoint_format == "gptq" else mid
        field = f"sym is true (checkpoint_format {cfg.checkpoint_format} stores {want})"
    if not bool((stored == want).all()):
        raise FormatError(
            f"{source}: tensor {prefix}.qzeros holds zero points other than {mid}, but {field} in {cfg.where}"
        )


def gptq_tensor(prefix: str, parts: dict[str, torch.Tensor], cfg: GPTQConfig, source) -> GPTQTensor:
    """The GPTQTensor of the quantized linear ``prefix`` from its stored parts (``qweight``,
    ``qzeros``, ``scales``, and ``g_idx`` where present), all checked."""
    shapes = {k: tuple(t.shape) for k, t in parts.items()}
    dtypes = {k: t.dtype for k, t in parts.items()}
    n_out, n_in = check_gptq_shapes(prefix, shapes, dtypes, cfg, source)
    g_idx = parts.get("g_idx")
    if g_idx is not None:
        check_g_idx(prefix, g_idx, parts["scales"].shape[0], cfg, source)
    offset = 1 if cfg.checkpoint_format == "gptq" else 0
    t = GPTQTensor(
        cfg.quant_method, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, parts["qweight"],
        parts["qzeros"], parts["scales"], g_idx, (n_out, n_in), offset,
    )  # fmt: skip
    check_sym_zeros(prefix, parts["qzeros"], n_out, cfg, source)
    return t
