"""Small fused CPU ops where the per-op dispatch of the reference costs more than the math:
RMSNorm (with the residual add), rotary embedding, SiLU-and-multiply."""

from __future__ import annotations

import numba as nb
import torch
import torch.nn.functional as F

from tessera.kernels import reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # torch's fused kernel; in float32 as the reference, then back to the input's dtype
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def fused_add_rms_norm(x, residual, weight, eps):
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


@nb.njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _rotate(x, cos, sin, head_dim):
    """In place on x ``[T, H*D]``: pairs (i, i + D/2) of every head rotated by the token's angle."""
    t_count = x.shape[0]
    heads = x.shape[1] // head_dim
    half = head_dim // 2
    for t in nb.prange(t_count):
        for h in range(heads):
            base = h * head_dim
            for i in range(half):
                c = cos[t, i]
                s = sin[t, i]
                a = x[t, base + i]
                b = x[t, base + half + i]
                x[t, base + i] = a * c - b * s
                x[t, base + half + i] = b * c + a * s


def rotary_embedding(query, key, cos, sin, head_dim: int):
    if query.dtype != torch.float32 or cos.dtype != torch.float32:
        return reference.rotary_embedding(query, key, cos, sin, head_dim)
    q = query.clone(memory_format=torch.contiguous_format)
    k = key.clone(memory_format=torch.contiguous_format)
    c, s = cos.contiguous().numpy(), sin.contiguous().numpy()
    _rotate(q.numpy(), c, s, head_dim)
    _rotate(k.numpy(), c, s, head_dim)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]).mul_(x[..., half:])
