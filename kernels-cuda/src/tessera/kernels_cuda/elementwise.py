"""RMSNorm (+ residual), rotary embedding, SiLU/GELU-and-multiply on the GPU: the CUDA C++
kernels of csrc/elementwise.cu, launched on torch's current stream.

Each function takes the arguments of its reference in ``tessera.kernels.reference`` and returns
what the reference returns (new tensors; the inputs are never written). Arguments that break the
op's contract (mismatched shapes, an odd head size) raise ValueError. Valid arguments the kernels
do not cover are handed to the torch reference: tensors off the GPU, dtypes other than
fp32/fp16/bf16, a weight (or cos/sin) of another dtype than the input (the reference's type
promotion decides the result), and any call when the library could not be built.
"""

from __future__ import annotations

import torch

from tessera.kernels import reference

from . import native

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _native(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: all on one CUDA device, in a dtype the kernels
    have, and the library built."""
    first = tensors[0]
    if first.device.type != "cuda" or first.dtype not in DTYPE_CODES:
        return False
    for t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f"tensors on different devices: {first.device} and {t.device}")
    return native.library() is not None


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as ``[rows, last]`` with unit stride along the last dim (a view where one exists) and the
    row stride to hand the kernel."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2, (x2.stride(0) if x2.shape[0] > 1 else x2.shape[1])


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for x of shape {tuple(x.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm(x, weight)
    if weight.dtype != x.dtype or x.numel() == 0 or not _native(x, weight):
        return reference.rms_norm(x, weight, eps)
    x2, stride = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, n = x2.shape
    args = (out, x2, weight.contiguous(), rows, n, stride, eps, DTYPE_CODES[x.dtype])
    native.launch("rms_norm", x.device, *args)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm(x, weight)
    if residual.shape != x.shape:
        raise ValueError(
            f"fused_add_rms_norm: residual of shape {tuple(residual.shape)} for x of shape {tuple(x.shape)}"
        )
    same_dtype = residual.dtype == x.dtype == weight.dtype
    if not same_dtype or x.numel() == 0 or not _native(x, residual, weight):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    x2, x_stride = _rows(x)
    r2, r_stride = _rows(residual)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows, n = x2.shape
    w = weight.contiguous()
    args = (out, summed, x2, r2, w, rows, n, x_stride, r_stride, eps, DTYPE_CODES[x.dtype])
    native.launch("fused_add_rms_norm", x.device, *args)
    return out, summed


def rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if query.dim() != 2 or key.dim() != 2 or query.shape[0] != key.shape[0]:
        raise ValueError(
            f"rotary_embedding: query {tuple(query.shape)} and key {tuple(key.shape)} must be [T, H*D] "
            "with the same T"
        )
    if head_dim <= 0 or head_dim % 2 or query.shape[1] % head_dim or key.shape[1] % head_dim:
        raise ValueError(
            f"rotary_embedding: head_dim {head_dim} must be even and divide the widths of query "
            f"({query.shape[1]}) and key ({key.shape[1]})"
        )
    t = query.shape[0]
    if cos.shape != (t, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"rotary_embedding: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be "
            f"[T, head_dim/2] = [{t}, {head_dim // 2}]"
        )
    covered = (
        key.dtype == query.dtype and cos.dtype == sin.dtype and cos.dtype in (torch.float32, query.dtype)
    )
    if not covered or t == 0 or not _native(query, key, cos, sin):
        return reference.rotary_embedding(query, key, cos, sin, head_dim)
    q2, q_stride = _rows(query)
    k2, k_stride = _rows(key)
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    heads = (query.shape[1] // head_dim, key.shape[1] // head_dim)
    codes = (DTYPE_CODES[query.dtype], DTYPE_CODES[cos.dtype])
    cs = (cos.contiguous(), sin.contiguous())
    args = (q_out, k_out, q2, k2, *cs, t, *heads, head_dim, q_stride, k_stride, *codes)
    native.launch("rotary_embedding", query.device, *args)
    return q_out, k_out


def _act_and_mul(op: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of x {tuple(x.shape)} must be even (gate then up)")
    if x.numel() == 0 or not _native(x):
        return getattr(reference, op)(x)
    x2, stride = _rows(x)
    inter = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    native.launch(op, x.device, out, x2, x2.shape[0], inter, stride, DTYPE_CODES[x.dtype])
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul("silu_and_mul", x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul("gelu_tanh_and_mul", x)
