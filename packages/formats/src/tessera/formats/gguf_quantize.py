"""Quantizers for the simple GGUF block formats, in plain torch: a float matrix to the blocks
ggml's reference ``quantize_row_*_ref`` writes (the same rounding, so the bytes match
llama.cpp's and the ``gguf`` package's own quantizers).

Used where a weight is re-quantized at load (a speculative draft model streamed in fewer bytes
per token, an fp16 checkpoint run through the CPU backend's int8 products)."""

from __future__ import annotations

import torch

from .errors import FormatError
from .gguf_quants import BLOCK_LAYOUT
from .quantized import QuantizedTensor

QUANTIZABLE = ("Q4_0", "Q4_1", "Q8_0")


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[n, 1]`` float32 -> ``[n, 2]`` uint8 of its float16."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[n, 32]`` values 0..15 -> ``[n, 16]`` bytes: value j low, value j + 16 high (ggml's order)."""
    return (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)


def _recip(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # the value of largest magnitude (the first where several tie) maps to -8
    at = b.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(b, -1, at) / -8
    q = torch.trunc(b * _recip(d) + 8.5).clamp(0, 15).to(torch.int32)
    return torch.cat([_f16_bytes(d), _nibbles(q)], dim=-1)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    lo = b.min(dim=-1, keepdim=True).values
    hi = b.max(dim=-1, keepdim=True).values
    d = (hi - lo) / 15
    q = torch.trunc((b - lo) * _recip(d) + 0.5).clamp(0, 15).to(torch.int32)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    x = b * _recip(d)
    a = x.abs()  # C's roundf (halves away from zero), without a + 0.5 rounding up in float32
    q = torch.sign(x) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a))))
    return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=-1)


_QUANTIZE = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}


def quantize_gguf(weight: torch.Tensor, scheme: str, rows_per_chunk: int = 4096) -> QuantizedTensor:
    """``weight`` ``[out, in]`` (any float dtype) as ``scheme`` blocks along its input dimension.

    FormatError for a scheme other than ``QUANTIZABLE``, a weight that is not a matrix, an input
    dimension that is not a whole number of blocks, or values that are not finite."""
    scheme = scheme.upper()
    if scheme not in _QUANTIZE:
        raise FormatError(f"cannot quantize to {scheme!r}: the schemes are {', '.join(QUANTIZABLE)}")
    if weight.dim() != 2:
        raise FormatError(f"quantize_gguf takes a matrix, not a tensor of shape {tuple(weight.shape)}")
    n, k = weight.shape
    block, size = BLOCK_LAYOUT[scheme]
    if k % block:
        raise FormatError(f"{scheme} needs a multiple of {block} inputs; the weight has {k}")
    out = torch.empty((n, k // block * size), dtype=torch.uint8)
    for r0 in range(0, n, rows_per_chunk):  # bounded float32 temporaries for a large LM head
        part = weight[r0 : r0 + rows_per_chunk].detach().to("cpu", torch.float32)
        if not torch.isfinite(part).all():
            raise FormatError(f"cannot quantize a weight with non-finite values (rows {r0}..)")
        blocks = part.reshape(-1, block)
        out[r0 : r0 + part.shape[0]] = _QUANTIZE[scheme](blocks).reshape(part.shape[0], -1)
    return QuantizedTensor(scheme, out, (n, k))
