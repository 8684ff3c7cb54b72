"""GGUF weights kept packed on the CPU (Q4_0, Q4_1, Q8_0) and multiplied without dequantizing.

``prepare_linear_weight`` repacks a weight once at load (16 output rows side by side, see
csrc/qmatmul.c); ``linear`` multiplies with the packed bytes directly (each byte is read once
per call) and, for many bf16 tokens, dequantizes the weight into a reused buffer and calls
torch's GEMM, whichever measured faster (tools/bench/kernels.py).
"""

from __future__ import annotations

import threading

import torch

from tessera.kernels import reference

from . import native

# GGUF type numbers of the schemes the C kernels take
QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
QUANT_BYTES = {"Q4_0": 16, "Q4_1": 16, "Q8_0": 32}  # per row and block of 32, repacked

# Above this many tokens a bf16 product dequantizes into a scratch buffer and uses torch's
# GEMM (measured on 2 Zen 4 cores with the default model's shapes: the packed kernel is faster
# up to ~128 tokens in bf16, and at every size in fp32, where torch's GEMM is slower).
GEMV_MAX_TOKENS = 96


class PackedWeight:
    """A weight ``[out_features, in_features]`` in the repacked GGUF layout of the C kernels."""

    def __init__(self, scheme: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, shape):
        self.scheme, self.qtype = scheme, QTYPES[scheme]
        self.qs, self.d, self.m = qs, d, m
        self.shape = tuple(shape)

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantized: embedding lookups from a tied embedding matrix."""
        lib = native.library()
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(
            flat.numel(), self.shape[1], dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        )
        rc = lib.tessera_q_gather_rows(
            self.qtype,
            self.qs.data_ptr(),
            self.d.data_ptr(),
            self.m.data_ptr() if self.m is not None else None,
            self.shape[0],
            self.shape[1],
            flat.data_ptr(),
            flat.numel(),
            out.data_ptr(),
            int(out.dtype == torch.bfloat16),
        )
        if rc != 0:
            raise IndexError(f"token ids outside 0..{self.shape[0] - 1} for a {self.shape[0]}-row embedding")
        return out.to(dtype).reshape(*ids.shape, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[0]), dtype)


def _supported(weight) -> bool:
    shape = getattr(weight, "shape", ())
    return (
        getattr(weight, "scheme", None) in QTYPES
        and len(shape) == 2
        and shape[0] % 16 == 0
        and shape[1] % 32 == 0
        and weight.device.type == "cpu"
    )


def prepare_linear_weight(weight, dtype: torch.dtype):
    """A packed weight for the C kernels where they take its scheme, else the reference's
    dequantized tensor."""
    lib = native.library()
    if lib is None or not _supported(weight):
        return reference.prepare_linear_weight(weight, dtype)
    n, k = weight.shape
    groups, blocks = n // 16, k // 32
    qs = torch.empty(groups * blocks * QUANT_BYTES[weight.scheme] * 16, dtype=torch.uint8)
    d = torch.empty(groups * blocks * 16, dtype=torch.int16)
    m = torch.empty_like(d) if weight.scheme == "Q4_1" else None
    src = weight.data.contiguous()
    rc = lib.tessera_q_repack(
        QTYPES[weight.scheme],
        src.data_ptr(),
        n,
        k,
        qs.data_ptr(),
        d.data_ptr(),
        m.data_ptr() if m is not None else None,
    )
    if rc != 0:
        raise ValueError(f"cannot repack a {weight.scheme} weight of shape {tuple(weight.shape)}")
    return PackedWeight(weight.scheme, qs, d, m, weight.shape)


_scratch = threading.local()


def _dequantized_t(weight: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` transposed (``[in, out]``) and dequantized into a buffer reused by every weight
    of the same size (one per thread)."""
    key = (weight.shape, dtype)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(
            weight.shape[::-1], dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        )
    lib = native.library()
    rc = lib.tessera_q_dequantize_t(
        weight.qtype,
        weight.qs.data_ptr(),
        weight.d.data_ptr(),
        weight.m.data_ptr() if weight.m is not None else None,
        weight.shape[0],
        weight.shape[1],
        buf.data_ptr(),
        int(buf.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"cannot dequantize a {weight.scheme} weight of shape {weight.shape}")
    return buf if buf.dtype == dtype else buf.to(dtype)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(weight, PackedWeight):
        return reference.linear(x, weight, bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    tokens = x2.shape[0]
    if x.dtype not in (torch.float32, torch.bfloat16) or (
        x.dtype == torch.bfloat16 and tokens > GEMV_MAX_TOKENS
    ):
        out = torch.mm(x2, _dequantized_t(weight, x.dtype))
        if bias is not None:
            out += bias
        return out.reshape(*lead, n)
    x2 = x2.contiguous()
    out = torch.empty(tokens, n, dtype=x.dtype)
    rc = native.library().tessera_q_matmul(
        weight.qtype,
        x2.data_ptr(),
        int(x.dtype == torch.bfloat16),
        tokens,
        k,
        n,
        weight.qs.data_ptr(),
        weight.d.data_ptr(),
        weight.m.data_ptr() if weight.m is not None else None,
        out.data_ptr(),
        int(out.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"the packed {weight.scheme} matmul refused x of shape {tuple(x.shape)}")
    if bias is not None:
        out += bias
    return out.reshape(*lead, n)
