"""Writing EXL2: scales on exllamav2's grid, one linear's packed tensors, a whole model folder.

The layout is described in ``exl2.py``. A quantizer puts its scales on the grid first
(``exl2_scale_grid``), rounds its weights with the exact scales it gets back, and hands the
resulting symmetric ``GroupQuant`` to ``exl2_parts`` (or to ``write_exl2_folder`` under the name
of the weight it replaces); everything exllamav2 could not read back is refused before a byte
is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from itertools import groupby, pairwise
from pathlib import Path

import torch

from .errors import FormatError
from .exl2 import EXL2_BITS, MAX_INPUTS, exl2_config_from_hf, exl2_scale, group_step
from .grouped import GroupQuant


def exl2_scale_grid(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The EXL2 scales nearest to ``scale`` (float ``[out, groups]``, >= 0), for a quantizer to
    round weights with: ``(levels uint8 [out, groups] in 1..16, q_scale_max float16 [groups],
    exact float32 [out, groups])``. Levels are ``round(16 * sqrt(scale / max))`` as exllamav2's
    ``find_params``; ``q_scale_max`` is returned as 256 times the fp16 ``max / 256`` that the
    kernels use, so the largest exact scale of a group equals it and ``exl2_parts`` finds it back."""
    s = scale.detach().float()
    if s.dim() != 2 or not bool(s.isfinite().all()) or bool((s < 0).any()):
        raise ValueError(f"scale must be a finite, non-negative [out, groups] matrix, not {list(s.shape)}")
    smax = s.max(dim=0).values
    max_scale = (smax / 256).to(torch.float16)
    tiny = torch.finfo(torch.float16).smallest_normal * 2.0**-10  # smallest fp16 subnormal
    max_scale = torch.where((smax > 0) & (max_scale == 0), torch.tensor(tiny, dtype=torch.float16), max_scale)
    q_scale_max = max_scale.float() * 256
    if not bool(q_scale_max.to(torch.float16).isfinite().all()):
        raise ValueError(f"a group's largest scale {float(smax.max())} is beyond float16")
    ratio = torch.where(q_scale_max > 0, s / q_scale_max.clamp(min=tiny), 1.0)
    levels = torch.clamp(torch.round(16 * ratio.sqrt()), 1, 16).to(torch.uint8)
    q_scale_max = q_scale_max.to(torch.float16)
    return levels, q_scale_max, exl2_scale(levels, q_scale_max)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int ``[rows, cols]`` of ``bits``-bit values -> int32 ``[ceil(rows*bits/32), cols]``, each
    column one little-endian bit stream (the inverse of ``gptq.unpack_rows``). Every 32 values
    fill exactly ``bits`` words, so the values are taken in stripes of 32 rows and each of the 32
    positions ORed into its word (and the next, where it straddles): 32 whole-tensor operations
    in int32, fast enough for an 8B model's matrices."""
    rows, cols = values.shape
    n_words = -(-rows * bits // 32)
    v = values.to(torch.int32)
    v &= (1 << bits) - 1
    if rows % 32:
        v = torch.cat([v, v.new_zeros(-rows % 32, cols)])
    v = v.reshape(-1, 32, cols)
    out = torch.zeros(v.shape[0], bits, cols, dtype=torch.int32)
    for j in range(32):
        word, off = divmod(j * bits, 32)
        out[:, word] |= v[:, j] << off  # bits past 31 fall off: the spill below carries them
        if off + bits > 32:
            out[:, word + 1] |= v[:, j] >> (32 - off)
    return out.reshape(-1, cols)[:n_words].contiguous()


def _pack_levels(levels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[groups, out]`` levels 1..16 -> int32 ``[groups, out/8]`` nibbles of ``level - 1``."""
    g, n_out = levels.shape
    nib = (levels.to(torch.int64) - 1).reshape(g, n_out // 8, 8)
    words = (nib << (torch.arange(8) * 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _recover_levels(g: GroupQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels [out, groups], q_scale_max [groups])`` that give ``g.scale`` exactly; a
    ValueError where a scale is off EXL2's grid (not made by ``exl2_scale_grid``)."""
    s = g.scale.float().cpu()
    q_scale_max = s.max(dim=0).values.to(torch.float16)
    table = exl2_scale(torch.arange(1, 17)[:, None].expand(16, g.groups), q_scale_max)  # [16, groups]
    levels = (s[:, None, :] - table[None]).abs().argmin(dim=1) + 1
    exact = exl2_scale(levels, q_scale_max)
    bad = torch.nonzero(exact != s)
    if len(bad):
        r, c = bad[0].tolist()
        raise ValueError(
            f"scale {float(s[r, c])} of output {r}, group {c} is not on EXL2's grid "
            "(put scales on it with exl2_scale_grid before rounding weights)"
        )
    return levels.to(torch.uint8), q_scale_max


def check_writable(g: GroupQuant) -> None:
    """A ValueError naming what exllamav2 could not read back from ``g``."""
    n_out, n_in = g.shape
    if any(b not in EXL2_BITS for b in g.group_bits):
        raise ValueError(f"group bit widths {sorted(set(g.group_bits))}: EXL2 has {EXL2_BITS}")
    if any(b > a for a, b in pairwise(g.group_bits)):
        raise ValueError(f"group bit widths {g.group_bits} do not run from widest to narrowest")
    for i, (a, b) in enumerate(pairwise(g.group_starts)):
        if (b - a) % group_step(g.group_bits[i]):
            raise ValueError(
                f"group {i} spans {b - a} inputs, not a multiple of {group_step(g.group_bits[i])} "
                f"at {g.group_bits[i]} bits"
            )
    if n_out % 32:
        raise ValueError(f"{n_out} outputs: exllamav2 reads outputs in multiples of 32 (pads them)")
    if n_in > MAX_INPUTS:
        raise ValueError(f"{n_in} inputs: exllamav2 reads the permutation as uint16 (at most {MAX_INPUTS})")
    zero = torch.tensor([2.0 ** (b - 1) for b in g.group_bits])
    if not bool((g.zero.float().cpu() == zero).all()):
        raise ValueError("zero points other than 2**(bits-1): EXL2 is symmetric")
    top = torch.tensor([2**b - 1 for b in g.group_bits])[g.column_groups().cpu()]
    if bool((g.q.cpu() > top.to(torch.uint8)).any()):
        raise ValueError("integers beyond their group's bit width")


def exl2_parts(g: GroupQuant) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear (``q_weight``, ``q_scale``, ``q_scale_max``, ``q_groups``,
    ``q_invperm``; names without the prefix) from a symmetric GroupQuant whose scales lie on
    EXL2's grid; a ValueError where exllamav2 could not read them back."""
    check_writable(g)
    levels, q_scale_max = _recover_levels(g)
    q = g.q.cpu().T.contiguous()  # [in, out]: each output's bit stream runs down the stored inputs
    words, groups = [], []
    row = 0
    # every group spans whole words (check_writable), so a run of one width packs in one call
    for bits, run in groupby(range(g.groups), key=lambda i: g.group_bits[i]):
        run = list(run)
        a, b = g.group_starts[run[0]], g.group_starts[run[-1] + 1]
        packed = pack_rows(q[a:b], bits)
        for i in run:
            groups += [bits, row + (g.group_starts[i] - a) * bits // 32]
        words.append(packed)
        row += packed.shape[0]
    if row >= 2**15:
        raise ValueError(f"{row} packed rows: q_groups holds row offsets as int16")
    n_in = g.shape[1]
    perm = torch.arange(n_in) if g.perm is None else g.perm.cpu().long()
    return {
        "q_weight": torch.cat(words).contiguous(),
        "q_scale": _pack_levels(levels.T.contiguous()),
        "q_scale_max": q_scale_max.contiguous(),
        "q_groups": torch.tensor(groups, dtype=torch.int16),
        "q_invperm": torch.argsort(perm).to(torch.int32),
    }


_RESERVED = ("config.json", "model.safetensors", "model.safetensors.index.json", "measurement.json")


def _folder_tensors(tensors: dict, dst: Path) -> dict[str, torch.Tensor]:
    """The tensors to store: each GroupQuant ``<prefix>.weight`` as its EXL2 parts."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, GroupQuant):
            if not name.endswith(".weight"):
                raise FormatError(f"{dst}: quantized tensor {name} must be named <prefix>.weight")
            prefix = name.removesuffix(".weight")
            try:
                parts = exl2_parts(t)
            except ValueError as e:
                raise FormatError(f"{dst}: tensor {name} cannot be stored as EXL2: {e}") from e
            items = {f"{prefix}.{k}": v for k, v in parts.items()}
        elif isinstance(t, torch.Tensor):
            items = {name: t.detach().cpu().contiguous()}
        else:
            raise FormatError(f"{dst}: tensor {name} is a {type(t).__name__}, not a tensor or GroupQuant")
        for key, value in items.items():
            if key in out or (key != name and key in tensors):
                raise FormatError(f"{dst}: tensor {key} would be written twice")
            out[key] = value
    return out


def _check_extra_files(extra_files: dict[str, Path], dst: Path) -> None:
    for name, src in extra_files.items():
        if Path(name).name != name or name in _RESERVED or name.endswith(".safetensors"):
            raise FormatError(
                f"{dst}: extra file name {name!r} is not a plain file name beside the weights "
                f"(not {', '.join(_RESERVED)} nor another *.safetensors, which exllamav2 would load)"
            )
        if not Path(src).is_file():
            raise FormatError(f"{src}: no such file (extra file {name} of {dst})")


def _json_text(value, what: str, dst: Path) -> str:
    try:
        return json.dumps(value, indent=4)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{dst}: {what} is not JSON ({e})") from e


def write_exl2_folder(
    dst: str | Path,
    hf_config: dict,
    tensors: dict[str, torch.Tensor | GroupQuant],
    quantization_config: dict,
    measurement: dict | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """An EXL2 model folder at ``dst``: ``model.safetensors`` (each GroupQuant ``<prefix>.weight``
    as its EXL2 parts, other tensors as given), ``config.json`` (``hf_config`` signed with
    ``quantization_config``), ``measurement.json`` where given, and ``extra_files`` (name ->
    source path: tokenizer files and the like) copied. Everything is checked first and written
    into a temporary folder beside ``dst`` that is renamed to ``dst`` at the end, so an error
    leaves nothing behind; ``dst`` must not exist or be an empty folder."""
    from safetensors.torch import save_file

    dst = Path(dst)
    extra_files = extra_files or {}
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise FormatError(f"{dst}: already exists and is not an empty folder")
    exl2_config_from_hf(quantization_config, f"{dst}/config.json")
    if not isinstance(hf_config, dict):
        raise FormatError(f"{dst}: hf_config is a {type(hf_config).__name__}, not a dict")
    config_text = _json_text({**hf_config, "quantization_config": quantization_config}, "config.json", dst)
    if measurement is not None and not isinstance(measurement, dict):
        raise FormatError(f"{dst}: measurement is a {type(measurement).__name__}, not a dict")
    measurement_text = None if measurement is None else _json_text(measurement, "measurement.json", dst)
    _check_extra_files(extra_files, dst)
    out = _folder_tensors(tensors, dst)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(config_text)
        if measurement_text is not None:
            (tmp / "measurement.json").write_text(measurement_text)
        for name, src in extra_files.items():
            shutil.copyfile(src, tmp / name)
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
