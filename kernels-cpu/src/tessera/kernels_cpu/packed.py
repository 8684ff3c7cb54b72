"""GGUF weights kept packed on the CPU (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and
multiplied without dequantizing.

``prepare_linear_weight`` repacks a weight once at load into a 4-, 5-, 6- or 8-bit form (16
output rows side by side, see csrc/qmatmul.c); ``linear`` multiplies with the packed bytes
directly: bf16 inputs quantized to int8 per 32 inputs (as llama.cpp's q8 activations) and
multiplied with VNNI dot products, fp32 inputs with FMAs over the exact weights.
"""

from __future__ import annotations

import threading

import torch

from tessera.kernels import InputSegments, RowStack, reference, segments_linear

from . import native, segments

# GGUF type numbers of the schemes the C kernels take
QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
# bits a weight's quant keeps in the repacked form: 4-bit nibbles, plus 1 or 2 bit planes above them
BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}
STORED_MIN = {"Q4_1", "Q5_1", "Q4_K", "Q5_K"}  # m stored per sub-block, else a multiple of d
SUB_BLOCKS = {"Q6_K": 2}  # scales per 32 inputs (Q6_K's sub-blocks are 16 long)
BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}  # inputs per GGUF block (else 32)

# Both paths beat dequantizing into a buffer and calling torch's GEMM at every size measured
# (2 Zen 4 cores, the default model's shapes, 1 to 2,048 tokens: int8 470-600 GFLOP/s against
# torch's bf16 GEMM's 220-420; tools/bench/kernels.py), so that is kept for other dtypes only.


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


def supported(weight) -> bool:
    """Whether the C kernels take this packed matrix (scheme, whole row groups and blocks)."""
    shape = getattr(weight, "shape", ())
    scheme = getattr(weight, "scheme", None)
    return (
        scheme in QTYPES
        and len(shape) == 2
        and shape[0] % 16 == 0
        and shape[1] % BLOCK.get(scheme, 32) == 0
        and weight.device.type == "cpu"
    )


def prepare_linear_weight(weight, dtype: torch.dtype):
    """A packed weight for the C kernels where they take its scheme, else the reference's
    dequantized tensor."""
    lib = native.library()
    if lib is None or not supported(weight):
        return reference.prepare_linear_weight(weight, dtype)
    n, k = weight.shape
    scheme = weight.scheme
    groups, blocks = n // 16, k // 32
    qs = torch.empty(groups * blocks * BITS[scheme] * 64, dtype=torch.uint8)  # 16 rows x 32 inputs
    d = torch.empty(groups * blocks * SUB_BLOCKS.get(scheme, 1) * 16, dtype=torch.int16)
    m = torch.empty_like(d) if scheme in STORED_MIN else None
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
    if rc == -2:  # a K-quant sub-block scale beyond fp16: keep the exact dequantized weight
        return reference.prepare_linear_weight(weight, dtype)
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


def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    out_dtype = out_dtype or x.dtype
    c_dtypes = (torch.float32, torch.bfloat16)
    if x.dtype in c_dtypes and out_dtype in c_dtypes:
        parts = segments.c_parts(weight)
        if parts is not None:  # packed, segments of packed (GPTQ, EXL2), row stacks of those
            return segments.matmul(parts, x, bias, out_dtype)
    if isinstance(weight, RowStack):
        sizes = [p.shape[0] for p in weight.parts]
        biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
        parts = [linear(x, p, b, out_dtype) for p, b in zip(weight.parts, biases, strict=True)]
        return torch.cat(parts, dim=-1)
    if isinstance(weight, InputSegments):
        return segments_linear(linear, x, weight, bias, out_dtype)
    if not isinstance(weight, PackedWeight):
        return reference.linear(x, weight, bias, out_dtype)
    # other dtypes: torch's GEMM over the dequantized weight
    n, k = weight.shape
    lead = x.shape[:-1]
    out = torch.mm(x.reshape(-1, k), _dequantized_t(weight, x.dtype))
    if bias is not None:
        out += bias
    return out.reshape(*lead, n).to(out_dtype)
