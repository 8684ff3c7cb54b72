"""Writing GPTQ checkpoints as GPTQModel saves them: a ``GroupQuant`` of one bit width and equal
groups as ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` (the layout ``gptq.py`` reads), and
the ``quantization_config`` that goes into config.json.

Which ``checkpoint_format``: ``"gptq"`` (v1) stores every zero point minus one, ``"gptq_v2"``
stores it as it is. v1 is what every GPTQ reader takes (vLLM, ExLlamaV2, AutoGPTQ, transformers,
GPTQModel), but a zero of 0 has no unambiguous v1 form: it is stored as -1, which readers that add
1 per value (AutoGPTQ, ExLlamaV2, vLLM, ours) read back as 2**bits while GPTQModel, which adds 1
to the whole packed word, reads 0 and borrows from the next value. Symmetric zeros sit at the
middle code, never 0, so they go out as v1; asymmetric ones go out as v2, exact for every reader
that takes it (GPTQModel, transformers through it, ours).
"""

from __future__ import annotations

from itertools import pairwise

import torch

from .gptq import GPTQ_BITS
from .grouped import GroupQuant


def checkpoint_format_for(sym: bool) -> str:
    """v1 where it is exact for every reader (symmetric zeros), else v2 (see the module doc)."""
    return "gptq" if sym else "gptq_v2"


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``[rows, cols]`` (each below ``2**bits``) -> int32 ``[ceil(rows*bits/32), cols]``
    holding, per column, one little-endian stream of ``bits``-bit values: the inverse of
    ``gptq.unpack_rows`` (3-bit values straddle words; the last word may be partly filled)."""
    rows, cols = values.shape
    v = values.to(torch.int64) & ((1 << bits) - 1)
    n_words = -(-rows * bits // 32)
    pos = torch.arange(rows, device=values.device) * bits
    word, off = pos // 32, pos % 32
    out = torch.zeros((n_words + 1, cols), dtype=torch.int64, device=values.device)
    out.index_add_(0, word, v << off[:, None])
    spill = off + bits > 32  # the high bits that continue in the next word
    if bool(spill.any()):
        out.index_add_(0, word[spill] + 1, v[spill] >> (32 - off[spill])[:, None])
    out = out[:n_words] & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def gptq_parts(groups: GroupQuant, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The four stored tensors of one GPTQ linear (``qweight``, ``qzeros``, ``scales`` float16,
    ``g_idx``) from a GroupQuant of one bit width whose groups have one size (the last may be
    shorter). Act-order keeps qweight in input order and says each input's group in g_idx."""
    bits = groups.group_bits[0]
    sizes = [b - a for a, b in pairwise(groups.group_starts)]
    n_out, n_in = groups.shape
    if set(groups.group_bits) != {bits} or bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ stores one bit width of {GPTQ_BITS}, not {sorted(set(groups.group_bits))}")
    if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:
        raise ValueError(f"GPTQ groups have one size, not {sorted(set(sizes))}")
    if bits == 3 and (n_in % 32 or n_out % 32):
        raise ValueError(f"3-bit GPTQ needs features in multiples of 32, not {n_out}x{n_in}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format {checkpoint_format!r} is not gptq or gptq_v2")
    offset = 1 if checkpoint_format == "gptq" else 0
    zeros = groups.zero.round().to(torch.int64)
    if offset and bool((zeros == 0).any()):
        raise ValueError("a zero point of 0 has no exact GPTQ v1 form; write gptq_v2")
    stored_group = groups.column_groups()
    q = groups.q.to(torch.int64)
    g_idx = stored_group
    if groups.perm is not None:
        inv = torch.argsort(groups.perm)
        q, g_idx = q[:, inv], stored_group[inv]
    return {
        "qweight": pack_rows(q.T.contiguous(), bits),
        "qzeros": pack_rows((zeros - offset).contiguous(), bits).T.contiguous(),
        "scales": groups.scale.T.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def gptq_quantization_config(
    bits: int, group_size: int, sym: bool, desc_act: bool, damp: float, quantizer: str,
    lm_head: dict | None = None,
) -> dict:  # fmt: skip
    """config.json's ``quantization_config`` as GPTQModel writes it (the fields readers use, and
    the ``meta`` that says who made it and how). ``lm_head``: the quantized LM head's settings
    (``bits``, ``group_size``, ``sym``, ``desc_act``), written as GPTQModel does, ``"lm_head":
    true`` and a ``dynamic`` rule for ``lm_head`` (vLLM and GPTQModel read it so)."""
    fmt = checkpoint_format_for(sym)  # the file's, the head's zeros included
    head = {"dynamic": {"lm_head": dict(lm_head)}} if lm_head is not None else {}
    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": lm_head is not None,
        **head,
        "method": "gptq",
        "quant_method": "gptq",
        "format": fmt,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [quantizer],
            "damp_percent": damp,
            "static_groups": False,
            "true_sequential": True,
            "act_group_aware": False,
            "mse": 0.0,
        },
    }
