"""Packed GGUF linear layers on CUDA (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): Triton and
CUDA C++.

``prepare_linear_weight`` repacks a GGUF matrix once at load into bit planes of int32 words with
an fp16 scale d per 32 inputs (16 for Q6_K) and, where the scheme has one, an fp16 offset m per
32 inputs: ``weight = d * (q - ZERO) + m`` (layout and rounding in :mod:`.gguf_layout`).

``linear`` then takes one of three paths, by the number of tokens M:

- M <= ``NATIVE_MAX_TOKENS`` (4), where the CUDA C++ library is built (``GEMV_KERNEL`` "native",
  the default): csrc/qgemv.cu. The activations are quantized once per call (shared by every part
  of a row stack) per token and 32 inputs to two int8 levels, ``x ~= s (a + b/254)`` (within
  2^-16 of the group's largest value: finer than the bf16/fp16 they came in), and each weight
  byte meets them in dp4a integer dot products; d, m and the offset apply per group in fp32.
  Measured on an H200 (BENCHMARKS.md, 2026-12-04 fourth session): Llama-3-8B's gate/up (Q4_K)
  at 1.9 TB/s, the Q8_0 LM head at 4.3 TB/s, the 8B model decodes at 298 tokens/s against the
  ``words`` kernel's 164.
- M <= ``GEMV_MAX_TOKENS`` otherwise: one Triton kernel reads each packed word once and
  dequantizes in registers. Two kernels, ``GEMV_KERNEL`` picks:

  - ``words`` (the default): one program per ``WORDS_BLOCK_N`` output rows and per token, over
    K a block of ``WORDS_BLOCK_W`` packed words (8 inputs each) at a time, with no reshape: for
    nibble position j, ``(lo >> 4j) & 15`` (plus the high plane's bits) minus ZERO is an exact
    integer multiplied with x[8w + j] into the word's fp32 sum; d and m apply once per word
    (``d * sum (q - ZERO) x + m * sum x``), not per weight.
  - ``dot``: one program per ``GEMV_BLOCK_N`` rows and 16 tokens; each tile of ``GEMV_BLOCK_K``
    inputs is unpacked to a ``[rows, K]`` tile, rounded to x's dtype and multiplied with all
    the tokens by ``tl.dot`` (tokens padded to 16).

  Neither's tile depends on M (nor does csrc/qgemv.cu's), so a token's result is the same
  whatever else is in the batch for every M up to the threshold. Results are written in
  ``out_dtype`` from the fp32 sums.
  Measured on an H200 (tools/gpu_check.py, probe stage; BENCHMARKS.md, 2026-12-04 GPU): at one
  token ``words`` (8 rows x 128 words) reads Llama-3-8B's gate/up (Q4_K) at 0.96 TB/s, ``dot`` at 0.43;
  the 8B model decodes at 162 tokens/s against 80. ``words`` repeats its work per token (0.14
  TB/s at 8 tokens) where ``dot`` costs the same for 1 to 16, and the dequantize + cuBLAS path
  matches ``dot`` from 2 tokens up: hence ``words`` up to 2 tokens, then cuBLAS.
- larger M: a Triton kernel dequantizes the weight into a buffer of x's dtype kept per size and
  dtype and reused by every weight of that size, and cuBLAS does the product (``F.linear``). A
  row stack dequantizes all its parts into one buffer: one GEMM. A matrix of more than
  ``DEQ_BUFFER_MAX`` values (an LM head) goes in runs of rows through one buffer of that size.

The two paths round differently (the GEMM's own reduction order), so a token's logits may differ
in the last bits between a batch of ``GEMV_MAX_TOKENS`` and one more.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessera.kernels import InputSegments, RowStack, reference, segments_linear

from . import native
from .gguf_layout import FORMS, Planes, repack

# at most this many tokens take the GEMV kernel; more dequantize + cuBLAS (see the docstring:
# "words" costs per token, and cuBLAS on a dequantized buffer is level with "dot" from 2 tokens)
GEMV_MAX_TOKENS = 2
GEMV_BLOCK_M = 16  # tokens per tl.dot (the minimum it takes; fewer are masked)
GEMV_BLOCK_N = 16  # output rows per program: 256 programs for a 4096-row matrix
# inputs per step: 64 bytes of each row's low plane. ptxas for sm_80 (Triton 3.9, 4 warps, 3
# stages): 80-168 registers and no spills at 128, up to 254 at 256; fp32 inputs (an FMA product,
# no tensor cores) spill kilobytes at 256, none at 64
GEMV_BLOCK_K = 128
GEMV_BLOCK_K_FP32 = 64
DEQ_BLOCK_N = 32
DEQ_BLOCK_K = 256
# values of the largest dequantization buffer (256 MiB in bf16): bigger matrices (an LM head)
# are dequantized and multiplied in runs of rows
DEQ_BUFFER_MAX = 1 << 27
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _dequant_tile(
    lo_ptr,
    hi_ptr,
    d_ptr,
    m_ptr,
    rows,  # int64 [BLOCK_N]
    row_ok,
    k0,
    K,
    s_lo,  # row strides of the planes, in elements (arguments, so Triton sees them divisible by 16)
    s_hi,
    s_d,
    s_m,
    HI_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Weights of ``rows`` x inputs ``k0 .. k0 + BLOCK_K - 1`` in fp32 (0 outside the matrix)."""
    wl = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    lo = tl.load(
        lo_ptr + rows[:, None] * s_lo + wl[None, :],
        mask=row_ok[:, None] & (wl < K // 8)[None, :],
        other=0,
    )
    q = (lo[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15
    q = tl.reshape(q, (BLOCK_N, BLOCK_K))
    if HI_BITS > 0:
        PER: tl.constexpr = 32 // HI_BITS
        wh = k0 // PER + tl.arange(0, BLOCK_K // PER)
        hi = tl.load(
            hi_ptr + rows[:, None] * s_hi + wh[None, :],
            mask=row_ok[:, None] & (wh < K // PER)[None, :],
            other=0,
        )
        h = (hi[:, :, None] >> (tl.arange(0, PER) * HI_BITS)[None, None, :]) & ((1 << HI_BITS) - 1)
        q = q | (tl.reshape(h, (BLOCK_N, BLOCK_K)) << 4)
    ws = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    d = tl.load(
        d_ptr + rows[:, None] * s_d + ws[None, :],
        mask=row_ok[:, None] & (ws < K // GROUP)[None, :],
        other=0.0,
    ).to(tl.float32)
    d = tl.reshape(tl.broadcast_to(d[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP)), (BLOCK_N, BLOCK_K))
    # d * (q - ZERO) is exact in fp32 (an 11-bit mantissa times at most 8 bits), so adding m
    # rounds once, as ggml's dequantizers do
    w = d * (q - ZERO).to(tl.float32)
    if HAS_M:
        wm = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        m = tl.load(
            m_ptr + rows[:, None] * s_m + wm[None, :],
            mask=row_ok[:, None] & (wm < K // 32)[None, :],
            other=0.0,
        ).to(tl.float32)
        w = w + tl.reshape(tl.broadcast_to(m[:, :, None], (BLOCK_N, BLOCK_K // 32, 32)), (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _qgemv_kernel(
    x_ptr,
    lo_ptr,
    hi_ptr,
    d_ptr,
    m_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    s_lo,
    s_hi,
    s_d,
    s_m,
    stride_xm,
    stride_om,
    HI_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[tokens of program (1), rows of program (0)] = x @ W[rows].T (+ bias)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rows = rn.to(tl.int64)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
            mask=m_ok[:, None] & (rk < K)[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            lo_ptr,
            hi_ptr,
            d_ptr,
            m_ptr,
            rows,
            n_ok,
            k0,
            K,
            s_lo,
            s_hi,
            s_d,
            s_m,
            HI_BITS,
            GROUP,
            ZERO,
            HAS_M,
            BLOCK_N,
            BLOCK_K,
        )
        w = w.to(x_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _qgemv_words_kernel(
    x_ptr,
    lo_ptr,
    hi_ptr,
    d_ptr,
    m_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    s_lo,
    s_hi,
    s_d,
    s_m,
    stride_xm,
    stride_om,
    HI_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    FAST_CVT: tl.constexpr = False,
):
    """out[token (1), rows of program (0)] = x @ W[rows].T (+ bias), one token per program, the
    weights taken a packed word (8 inputs) at a time with no reshape: for each nibble position
    j, ``(lo >> 4j) & 15`` (plus the high bits) minus ZERO is the integer q - ZERO of input
    8w + j, multiplied with x[8w + j] into the word's sum. The word's 8 inputs share one d (and
    m), so the scales apply per word, not per weight: ``acc += d * sum_j (q_j - ZERO) x_j +
    m * sum_j x_j``, all in fp32 (exact integers times x; more exact than a weight rounded to
    x's dtype). Per weight: a shift, a mask, a subtract, a conversion and an FMA. The same code
    for every M (a token's result does not depend on the batch); the other tokens' programs
    re-read the words from L2."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rows = rn.to(tl.int64)
    tok = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + tok * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, K // 8, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)  # word index: inputs 8w .. 8w + 7
        w_ok = w < K // 8
        ok = n_ok[:, None] & w_ok[None, :]
        lo = tl.load(lo_ptr + rows[:, None] * s_lo + w[None, :], mask=ok, other=0)
        if FAST_CVT:
            lo = lo.to(tl.uint32, bitcast=True)  # logical shifts: no sign extension
        if HI_BITS > 0:
            PER: tl.constexpr = 32 // HI_BITS  # inputs per high-bit word
            hi = tl.load(hi_ptr + rows[:, None] * s_hi + (w * 8 // PER)[None, :], mask=ok, other=0)
            if FAST_CVT:
                hi = hi.to(tl.uint32, bitcast=True)
        s = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        xs = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_row + w * 8 + j, mask=w_ok, other=0.0).to(tl.float32)
            q = (lo >> (4 * j)) & 15
            if HI_BITS > 0:
                shift = ((w * 8 + j) % PER) * HI_BITS
                q = q | (((hi >> shift[None, :]) & ((1 << HI_BITS) - 1)) << 4)
            if FAST_CVT:
                # q (< 2^8) in the mantissa of 2^23: the float 2^23 + q, exact; minus 2^23 + ZERO
                # is q - ZERO with a logical op and an add in place of an int-to-float conversion
                qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO)
            else:
                qf = (q - ZERO).to(tl.float32)
            s += qf * xj[None, :]
            xs += xj
        d = tl.load(d_ptr + rows[:, None] * s_d + (w * 8 // GROUP)[None, :], mask=ok, other=0.0)
        acc += d.to(tl.float32) * s
        if HAS_M:
            m = tl.load(m_ptr + rows[:, None] * s_m + (w // 4)[None, :], mask=ok, other=0.0)
            acc += m.to(tl.float32) * xs[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + tok * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dequant_kernel(
    lo_ptr,
    hi_ptr,
    d_ptr,
    m_ptr,
    ids_ptr,
    out_ptr,
    row0,
    R,
    N,
    K,
    s_lo,
    s_hi,
    s_d,
    s_m,
    HI_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_M: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[r] = W[ids[r]] (or W[row0 + r]) dequantized, for R output rows of K values; rows
    whose id is outside 0..N-1 become NaN."""
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = r < R
    k0 = tl.program_id(1) * BLOCK_K
    if HAS_IDS:
        rows = tl.load(ids_ptr + r, mask=r_ok, other=0).to(tl.int64)
    else:
        rows = row0 + r.to(tl.int64)
    valid = (rows >= 0) & (rows < N)
    w = _dequant_tile(
        lo_ptr,
        hi_ptr,
        d_ptr,
        m_ptr,
        rows,
        r_ok & valid,
        k0,
        K,
        s_lo,
        s_hi,
        s_d,
        s_m,
        HI_BITS,
        GROUP,
        ZERO,
        HAS_M,
        BLOCK_N,
        BLOCK_K,
    )
    w = tl.where(valid[:, None], w, float("nan"))
    rk = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        out_ptr + r.to(tl.int64)[:, None] * K + rk[None, :],
        w.to(out_ptr.dtype.element_ty),
        mask=r_ok[:, None] & (rk < K)[None, :],
    )


class PackedGPUWeight:
    """A GGUF matrix ``[out_features, in_features]`` in the bit-plane layout of the Triton kernels."""

    def __init__(self, scheme: str, planes: Planes, shape) -> None:
        self.scheme = scheme
        self.form = FORMS[scheme]
        self.planes = planes
        self.shape = tuple(shape)

    @property
    def device(self) -> torch.device:
        return self.planes.lo.device

    @property
    def nbytes(self) -> int:
        p = self.planes
        return sum(t.numel() * t.element_size() for t in (p.lo, p.hi, p.d, p.m) if t is not None)

    def _args(self) -> tuple:
        """The planes' pointers, then their row strides (absent planes: the low plane, unread)."""
        p = self.planes
        hi = p.hi if p.hi is not None else p.lo
        m = p.m if p.m is not None else p.d
        return (p.lo, hi, p.d, m), (p.lo.stride(0), hi.stride(0), p.d.stride(0), m.stride(0))

    def _constexprs(self) -> dict:
        f = self.form
        return {"HI_BITS": f.hi_bits, "GROUP": f.group, "ZERO": f.zero, "HAS_M": f.has_m}

    def _dequantize_into(self, out: torch.Tensor, ids: torch.Tensor | None, row0: int = 0) -> torch.Tensor:
        """out ``[R, K]`` (contiguous) = rows ``ids`` (or ``row0 .. row0 + R - 1``)."""
        r, k = out.shape
        if r == 0:
            return out
        planes, strides = self._args()
        grid = (triton.cdiv(r, DEQ_BLOCK_N), triton.cdiv(k, DEQ_BLOCK_K))
        _dequant_kernel[grid](
            *planes,
            ids if ids is not None else out,
            out,
            row0,
            r,
            self.shape[0],
            k,
            *strides,
            HAS_IDS=ids is not None,
            BLOCK_N=DEQ_BLOCK_N,
            BLOCK_K=DEQ_BLOCK_K,
            num_warps=4,
            **self._constexprs(),
        )
        return out

    def dequantize(
        self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None, row0: int = 0
    ) -> torch.Tensor:
        """The matrix in ``dtype``; with ``out`` (contiguous ``[R, K]``), its rows
        ``row0 .. row0 + R - 1`` written there."""
        if dtype not in _FLOAT:
            return self.dequantize(torch.float32).to(dtype)
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        return self._dequantize_into(out, None, row0)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantized: embedding lookups from a tied embedding matrix. Ids on the
        CPU are checked; on the GPU (no synchronization) an id out of range gives a row of NaN."""
        if ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"token ids outside 0..{self.shape[0] - 1} for a {self.shape[0]}-row embedding")
        flat = ids.reshape(-1).to(device=self.device, dtype=torch.int64).contiguous()
        kd = dtype if dtype in _FLOAT else torch.float32
        out = torch.empty(flat.numel(), self.shape[1], dtype=kd, device=self.device)
        self._dequantize_into(out, flat)
        return out.to(dtype).reshape(*ids.shape, self.shape[1])

    def __repr__(self) -> str:
        return f"PackedGPUWeight({self.scheme}, shape={self.shape}, device={self.device})"


def supported(weight) -> bool:
    """Whether the Triton kernels take this packed matrix (scheme, 2-D, whole blocks)."""
    scheme = getattr(weight, "scheme", None)
    shape = tuple(getattr(weight, "shape", ()))
    return scheme in FORMS and len(shape) == 2 and shape[1] % FORMS[scheme].block == 0 and shape[0] > 0


def prepare_linear_weight(weight, dtype: torch.dtype):
    """A :class:`PackedGPUWeight` for a GGUF matrix of one of the 8 schemes, on the weight's
    device; a plain tensor in ``dtype``; the reference's dequantized tensor for anything else
    (other schemes, expert stacks, K-quant scales beyond fp16)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    if not supported(weight):
        return reference.prepare_linear_weight(weight, dtype)
    n, k = weight.shape
    planes = repack(weight.scheme, weight.rows(), k)
    if planes is None:
        return reference.prepare_linear_weight(weight, dtype)
    return PackedGPUWeight(weight.scheme, planes, weight.shape)


# The few-token kernel: "native" (csrc/qgemv.cu: int8 dot products on activations quantized to
# two int8 levels, up to NATIVE_MAX_TOKENS tokens; "words" where the library could not be built),
# "words" (a Triton program per token, a packed word at a time) or "dot" (tokens padded to a
# tensor-core tile), and the Triton kernels' tiles; tools/gpu_check.py's probe stage times them
# on the GPU and picks for its benches.
GEMV_KERNEL = "native"
NATIVE_MAX_TOKENS = 4  # the launcher's limit (templates for 1..4 tokens)
WORDS_BLOCK_N = 8  # the probe's best on an H200 of 9 tiles (BENCHMARKS.md, 2026-12-04 GPU)
WORDS_BLOCK_W = 128
WORDS_WARPS = 4
WORDS_STAGES = 3
# q - ZERO through the float 2^23 + q (a logical op and an add) instead of an int-to-float
# conversion (I2FP, an eighth of the FFMA rate on sm_90): 64 conversions fewer per iteration in
# the sm_90 SASS of Q4_K. Off until a GPU run has timed it (tools/gpu_check.py's probe tries it).
WORDS_FAST_CVT = False


def set_gemv(spec: str) -> None:
    """``native``, ``dot`` or ``words[,BLOCK_N,BLOCK_W,WARPS,STAGES[,FAST_CVT]]`` (the probe's way
    to try a kernel in a whole model; ``TESSERA_CUDA_GEMV`` at import does the same)."""
    global GEMV_KERNEL, WORDS_BLOCK_N, WORDS_BLOCK_W, WORDS_WARPS, WORDS_STAGES, WORDS_FAST_CVT
    kind, *tile = spec.split(",")
    if kind not in ("native", "dot", "words") or len(tile) not in ((0, 4, 5) if kind == "words" else (0,)):
        raise ValueError(
            "TESSERA_CUDA_GEMV: 'native', 'dot' or 'words[,BLOCK_N,BLOCK_W,WARPS,STAGES[,FAST_CVT]]', "
            f"not {spec!r}"
        )
    GEMV_KERNEL = kind
    if tile:
        WORDS_BLOCK_N, WORDS_BLOCK_W, WORDS_WARPS, WORDS_STAGES = map(int, tile[:4])
        WORDS_FAST_CVT = len(tile) == 5 and tile[4] == "1"


if os.environ.get("TESSERA_CUDA_GEMV"):
    set_gemv(os.environ["TESSERA_CUDA_GEMV"])

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _native_takes(x2: torch.Tensor, parts: list) -> bool:
    """Whether csrc/qgemv.cu computes this product: selected, built, on a CUDA device, and every
    packed part's planes aligned for its vector loads."""
    if GEMV_KERNEL != "native" or x2.device.type != "cuda" or x2.shape[0] > NATIVE_MAX_TOKENS:
        return False
    if x2.shape[1] % 32 or native.library() is None:
        return False
    for p in parts:
        if isinstance(p, PackedGPUWeight):
            lo, hi = p.planes.lo, p.planes.hi
            if lo.data_ptr() % 16 or (hi is not None and hi.data_ptr() % 16):
                return False
    return True


def _x_layout(m: int, k: int) -> tuple[int, int, int]:
    """Byte offsets of the scales and the sums in _quantize_x's buffer, and its size: a, b, the
    scales and the sums each start 16-byte aligned (the kernel reads a and b by 16 bytes, the
    sums by 8), the scales' bytes rounded up since 4 M K/32 is not a multiple of 16 for every K
    (K = 288, M = 1)."""
    xs_at = 2 * m * k
    sums_at = xs_at + -(-4 * m * (k // 32) // 16) * 16
    return xs_at, sums_at, sums_at + 8 * m * (k // 32)


def _quantize_x(x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x ``[M, K]`` as csrc/qgemv.cu's two int8 levels ``[M, K]`` each, scales ``[M, K/32]`` and
    sums of 16 ``[M, K/16]`` (fp32), in one allocation."""
    m, k = x2.shape
    xs_at, sums_at, size = _x_layout(m, k)
    buf = torch.empty(size, dtype=torch.uint8, device=x2.device)
    xa, xb = buf[: m * k], buf[m * k : 2 * m * k]
    xs = buf[xs_at : xs_at + 4 * m * (k // 32)].view(torch.float32)
    xsum = buf[sums_at:].view(torch.float32)
    native.launch("q8x2_quantize", x2.device, xa, xb, xs, xsum, x2, m, k, x2.stride(0), _CODES[x2.dtype])
    return xa, xb, xs, xsum


def _native_gemv(q: tuple, w: PackedGPUWeight, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out ``[M, n]`` (a column slice of the output) = x @ W.T + bias, x quantized by _quantize_x."""
    m, n = out.shape
    k = w.shape[1]
    pl, f = w.planes, w.form
    b = None if bias is None else bias if bias.dtype in _CODES else bias.float()
    native.launch(
        "qgemv", out.device, out, out.stride(0), _CODES[out.dtype], pl.lo, pl.hi, pl.d, pl.m,
        b, _CODES[b.dtype] if b is not None else 0, *q, m, n, k, pl.lo.stride(0),
        pl.hi.stride(0) if pl.hi is not None else 0, pl.d.stride(0),
        pl.m.stride(0) if pl.m is not None else 0, f.hi_bits, f.group, f.zero, int(f.has_m),
    )  # fmt: skip


def _gemv(x2: torch.Tensor, w: PackedGPUWeight, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out ``[M, n]`` (rows may be strided, columns contiguous) = x2 @ W.T + bias."""
    m, k = x2.shape
    n = w.shape[0]
    planes, strides = w._args()
    # the arguments both kernels take, in their order
    b = bias if bias is not None else out  # not read without HAS_BIAS
    args = (x2, *planes, b, out, m, n, k, *strides, x2.stride(0), out.stride(0))
    if GEMV_KERNEL in ("words", "native"):  # native: where it does not take the product
        _qgemv_words_kernel[(triton.cdiv(n, WORDS_BLOCK_N), m)](
            *args,
            HAS_BIAS=bias is not None,
            BLOCK_N=WORDS_BLOCK_N,
            BLOCK_W=WORDS_BLOCK_W,
            FAST_CVT=WORDS_FAST_CVT,
            num_warps=WORDS_WARPS,
            num_stages=WORDS_STAGES,
            **w._constexprs(),
        )
        return
    _qgemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), triton.cdiv(m, GEMV_BLOCK_M))](
        *args,
        HAS_BIAS=bias is not None,
        IEEE=x2.dtype == torch.float32,
        BLOCK_M=GEMV_BLOCK_M,
        BLOCK_N=GEMV_BLOCK_N,
        BLOCK_K=GEMV_BLOCK_K_FP32 if x2.dtype == torch.float32 else GEMV_BLOCK_K,
        num_warps=4,
        **w._constexprs(),
    )


_buffers: dict[tuple, torch.Tensor] = {}


def _buffer(rows: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A dequantization buffer ``[rows, k]`` reused by every weight of that size and dtype
    (kernels queue in stream order: the next weight's dequantization starts after this product
    has read it)."""
    key = (rows, k, dtype, device)
    buf = _buffers.get(key)
    if buf is None:
        buf = _buffers[key] = torch.empty(rows, k, dtype=dtype, device=device)
    return buf


def _segments(weight, chunk: int):
    """Runs of at most ``chunk`` output rows: lists of (part, first row in it, rows) that fill
    one buffer, and the output column each run starts at."""
    parts = weight.parts if isinstance(weight, RowStack) else [weight]
    run, filled, start, col = [], 0, 0, 0
    for p in parts:
        r = 0
        while r < p.shape[0]:
            take = min(p.shape[0] - r, chunk - filled)
            run.append((p, r, take))
            r, filled, col = r + take, filled + take, col + take
            if filled == chunk:
                yield run, start
                run, filled, start = [], 0, col
    if run:
        yield run, start


def _many_tokens(x2: torch.Tensor, weight, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize into a reused buffer (``DEQ_BUFFER_MAX`` values at most: a big LM head goes in
    several runs of rows) and multiply with cuBLAS."""
    n, k = weight.shape
    chunk = max(1, min(n, DEQ_BUFFER_MAX // k))
    bias = bias.to(x2.dtype) if bias is not None else None
    out = None if chunk == n else torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    for run, c0 in _segments(weight, chunk):
        rows = sum(take for _, _, take in run)
        buf = _buffer(chunk, k, x2.dtype, x2.device)[:rows]
        r = 0
        for p, first, take in run:
            if isinstance(p, PackedGPUWeight):
                p.dequantize(x2.dtype, out=buf[r : r + take], row0=first)
            else:
                dense = p if isinstance(p, torch.Tensor) else p.dequantize(x2.dtype)
                buf[r : r + take] = dense[first : first + take]
            r += take
        b = bias[c0 : c0 + rows] if bias is not None else None
        if out is None:
            return F.linear(x2, buf, b).to(out_dtype)
        out[:, c0 : c0 + rows] = F.linear(x2, buf, b)
    return out.to(out_dtype)


def _packed_parts(weight) -> bool:
    parts = weight.parts if isinstance(weight, RowStack) else [weight]
    return any(isinstance(p, PackedGPUWeight) for p in parts)


def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x @ W.T + b`` as the reference's ``linear``; ``weight`` is what ``prepare_linear_weight``
    made (or a ``RowStack`` of such parts)."""
    if isinstance(weight, InputSegments):
        return segments_linear(linear, x, weight, bias, out_dtype)
    if isinstance(weight, RowStack) and any(isinstance(p, InputSegments) for p in weight.parts):
        sizes = [p.shape[0] for p in weight.parts]
        biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
        outs = [linear(x, p, b, out_dtype) for p, b in zip(weight.parts, biases, strict=True)]
        return torch.cat(outs, dim=-1)
    out_dtype = out_dtype or x.dtype
    if not _packed_parts(weight) or x.dtype not in _FLOAT or out_dtype not in _FLOAT:
        return reference.linear(x, weight, bias, out_dtype)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} inputs, the weight {tuple(weight.shape)} takes {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    tokens = x2.shape[0]
    parts = weight.parts if isinstance(weight, RowStack) else [weight]
    use_native = _native_takes(x2, parts)
    if tokens > GEMV_MAX_TOKENS and not use_native:
        return _many_tokens(x2, weight, bias, out_dtype).reshape(*lead, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(tokens, n, dtype=out_dtype, device=x.device)
    if tokens == 0:
        return out.reshape(*lead, n)
    q = _quantize_x(x2) if use_native else None  # once for every part of a stack
    r0 = 0
    for p in parts:
        r1 = r0 + p.shape[0]
        b = bias[r0:r1] if bias is not None else None
        if isinstance(p, PackedGPUWeight):
            b = b.contiguous() if b is not None else None
            if q is not None:
                _native_gemv(q, p, b, out[:, r0:r1])
            else:
                _gemv(x2, p, b, out[:, r0:r1])
        else:
            out[:, r0:r1] = reference.linear(x2, p, b, out_dtype)
        r0 = r1
    return out.reshape(*lead, n)
