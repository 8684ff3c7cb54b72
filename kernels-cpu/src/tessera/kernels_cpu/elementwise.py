"""Small fused CPU ops where the per-op dispatch of the reference costs more than the math:
RMSNorm (with the residual add), rotary embedding, SiLU-and-multiply."""

from __future__ import annotations

import numba as nb
import torch
import torch.nn.functional as F

from tessera.kernels import reference

from . import native


def _bf16_lib(*tensors: torch.Tensor, multiple: int = 16):
    """The C library when every tensor is contiguous bf16 and the last dim divides by `multiple`."""
    for t in tensors:
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.shape[-1] % multiple:
            return None
    return native.library()


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise ValueError(f"the bf16 {op} kernel refused its arguments (code {rc})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    lib = _bf16_lib(x, weight)
    if lib is not None and x.dim() == 2:
        out = torch.empty_like(x)
        n = x.shape[-1]
        rc = lib.tessera_rms_norm_bf16(
            x.data_ptr(),
            None,
            weight.data_ptr(),
            out.data_ptr(),
            None,
            x.shape[0],
            n,
            eps,
            torch.get_num_threads(),
        )
        _check(rc, "rms_norm")
        return out
    # torch's fused kernel; in float32 as the reference, then back to the input's dtype
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def fused_add_rms_norm(x, residual, weight, eps):
    lib = _bf16_lib(x, residual, weight)
    if lib is not None and x.dim() == 2 and x.shape == residual.shape:
        out, summed = torch.empty_like(x), torch.empty_like(x)
        rc = lib.tessera_rms_norm_bf16(
            x.data_ptr(),
            residual.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            summed.data_ptr(),
            x.shape[0],
            x.shape[1],
            eps,
            torch.get_num_threads(),
        )
        _check(rc, "fused_add_rms_norm")
        return out, summed
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


def _rotary_bf16(lib, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    t = out.shape[0]
    rc = lib.tessera_rotary_bf16(
        out.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        t,
        out.shape[1] // head_dim,
        head_dim,
        out.shape[1],
        torch.get_num_threads(),
    )
    _check(rc, "rotary_embedding")
    return out


def rotary_embedding(query, key, cos, sin, head_dim: int):
    if (
        query.dtype == torch.bfloat16
        and key.dtype == torch.bfloat16
        and cos.dtype == torch.float32
        and head_dim % 32 == 0
        and (lib := native.library()) is not None
    ):
        cos, sin = cos.contiguous(), sin.contiguous()
        return _rotary_bf16(lib, query, cos, sin, head_dim), _rotary_bf16(lib, key, cos, sin, head_dim)
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
    lib = _bf16_lib(x, multiple=32)
    if lib is not None and x.dim() == 2:
        out = torch.empty(x.shape[0], half, dtype=x.dtype)
        _check(
            lib.tessera_silu_and_mul_bf16(
                x.data_ptr(), out.data_ptr(), x.shape[0], half, torch.get_num_threads()
            ),
            "silu_and_mul",
        )
        return out
    return F.silu(x[..., :half]).mul_(x[..., half:])
