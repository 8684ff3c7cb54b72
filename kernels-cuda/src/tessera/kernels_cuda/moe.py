"""The mixture-of-experts MLP on CUDA in Triton: tokens sorted by expert, grouped GEMMs over the
packed experts.

``prepare_expert_weights`` repacks a 3-D GGUF tensor ``[E, N, K]`` once at load: its bytes are a
2-D ``[E*N, K]`` matrix (expert e owns rows ``e*N .. (e+1)*N - 1``), so it becomes one
:class:`PackedGPUWeight` of ``E*N`` rows in the bit-plane layout of :mod:`.quant_linear`.

``fused_moe`` routes with the reference's ``route``, then, with torch ops on the device and no
host synchronization (no data-dependent shape, so a CUDA graph can capture it):

1. the T*k (token, slot) pairs, numbered ``p = t*k + j``, are sorted by expert (stable), and each
   expert's run is padded to a multiple of ``BLOCK_M`` in a buffer of the static size
   ``T*k + E*(BLOCK_M - 1)`` (rounded up to whole blocks) filled with the sentinel ``T*k``;
   every block of ``BLOCK_M`` entries is given its expert (-1 for the unused blocks at the end);
2. ``_moe_gemm_kernel`` over (block, tile of ``BLOCK_N`` output rows): the block's rows of x
   (gathered by ``p // k``) times its expert's rows ``e*2I + n`` of gate_up, dequantized tile by
   tile in registers, fp32 sums, written per pair in x's dtype (as the reference rounds) ``[T*k, 2I]``;
3. ``silu(gate) * up`` in torch (the reference's own ops) ``[T*k, I]``;
4. the same kernel over down's rows ``e*H + n``, rows gathered by ``p``, kept in fp32 ``[T*k, H]``;
5. ``_combine_kernel``: ``out[t] = sum_j w[t, j] * y[t*k + j]`` in top-k order, fp32, in x's dtype.

Plain-tensor experts (the reference's prepared tensors: schemes without a layout here, K-quant
scales beyond fp16, float checkpoints) take the same path with the tile loaded instead of
dequantized. Inputs other than fp32/fp16/bf16 go to the torch reference.

Batch invariance: ``BLOCK_M``, ``BLOCK_N`` and ``BLOCK_K`` never depend on T, a row's sum over K
runs in one order in its own row of ``tl.dot``, and the combine adds a token's k outputs in
top-k order; so a token's output is the same bits whatever else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessera.kernels import moe as reference

from .gguf_layout import FORMS, Planes, repack
from .quant_linear import PackedGPUWeight, _dequant_tile

# pairs per block: one fixed size (batch invariance). 16 is tl.dot's minimum and wastes the
# least on decode steps, where an expert sees a few tokens; a prefill re-dequantizes an
# expert's tiles once per 16 of its tokens (a measured larger size may pay off there)
BLOCK_M = 16
# the tile of the packed GEMV in quant_linear (no spills on sm_80/sm_90 at these sizes)
BLOCK_N = 16
BLOCK_K = 128
BLOCK_K_FP32 = 64
COMBINE_BLOCK = 256
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class PackedGPUExperts:
    """Stacked expert matrices ``[E, N, K]`` as one packed matrix of ``E*N`` rows."""

    def __init__(self, packed: PackedGPUWeight, n_experts: int) -> None:
        rows, k = packed.shape
        if rows % n_experts:
            raise ValueError(f"{rows} packed rows are not {n_experts} experts")
        self.packed = packed
        self.scheme = packed.scheme
        self.shape = (n_experts, rows // n_experts, k)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def expert(self, e: int) -> PackedGPUWeight:
        """Expert ``e`` as a packed matrix ``[N, K]`` whose planes are views of this one's."""
        n_experts, n, k = self.shape
        if not 0 <= e < n_experts:
            raise IndexError(f"expert {e} of a stack of {n_experts} experts")
        p = self.packed.planes
        r = slice(e * n, (e + 1) * n)
        planes = Planes(
            p.lo[r], p.hi[r] if p.hi is not None else None, p.d[r], p.m[r] if p.m is not None else None
        )
        return PackedGPUWeight(self.scheme, planes, (n, k))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize(dtype).reshape(self.shape)

    def __repr__(self) -> str:
        return f"PackedGPUExperts({self.scheme}, shape={self.shape}, device={self.device})"


def prepare_expert_weights(weight, dtype: torch.dtype):
    """:class:`PackedGPUExperts` for a 3-D GGUF tensor of a scheme the Triton kernels read; the
    reference's tensor in ``dtype`` for plain tensors and everything else."""
    shape = tuple(getattr(weight, "shape", ()))
    if isinstance(weight, torch.Tensor) or len(shape) != 3 or not hasattr(weight, "rows"):
        return reference.prepare_expert_weights(weight, dtype)
    n_experts, n, k = shape
    scheme = getattr(weight, "scheme", None)
    if scheme not in FORMS or k % FORMS[scheme].block or n_experts * n == 0:
        return reference.prepare_expert_weights(weight, dtype)
    flat = (n_experts * n, k)  # the same bytes read as one matrix
    planes = repack(weight.scheme, weight.rows(), k)
    if planes is None:  # a K-quant scale beyond fp16
        return reference.prepare_expert_weights(weight, dtype)
    return PackedGPUExperts(PackedGPUWeight(weight.scheme, planes, flat), n_experts)


@triton.jit
def _moe_gemm_kernel(
    x_ptr,
    w_ptr,  # dense weights [E*N, K] (unless PACKED)
    lo_ptr,
    hi_ptr,
    d_ptr,
    m_ptr,
    pairs_ptr,  # int32 [blocks * BLOCK_M]: pair ids sorted by expert, padded with num_pairs
    block_expert_ptr,  # int32 [blocks]: -1 past the end
    out_ptr,
    num_pairs,
    x_row_div,  # x row of pair p: p // x_row_div (top_k for gate_up, 1 for down)
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    s_lo,
    s_hi,
    s_d,
    s_m,
    PACKED: tl.constexpr,
    HI_BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_M: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[pairs of block (0), rows of tile (1)] = x[pairs // x_row_div] @ W[e*N + rows].T."""
    e = tl.load(block_expert_ptr + tl.program_id(0))
    if e < 0:
        return
    pairs = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    p_ok = pairs < num_pairs
    xrow = (pairs // x_row_div).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rows = e.to(tl.int64) * N + rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(
            x_ptr + xrow[:, None] * stride_xm + rk[None, :], mask=p_ok[:, None] & k_ok[None, :], other=0.0
        )
        if PACKED:
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
        else:
            w = tl.load(
                w_ptr + rows[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
            )
        # rounded to x's dtype first, as the reference rounds the expert's weight
        w = w.to(x_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    tl.store(
        out_ptr + pairs.to(tl.int64)[:, None] * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=p_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _combine_kernel(
    y_ptr,  # fp32 [T*k, H]
    w_ptr,  # fp32 [T, k]
    out_ptr,  # [T, H]
    H,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[t] = sum over j in top-k order of w[t, j] * y[t*k + j], in fp32."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        wj = tl.load(w_ptr + t * TOP_K + j)
        acc += wj * tl.load(y_ptr + (t * TOP_K + j) * H + cols, mask=ok, other=0.0)
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _sort_by_expert(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair ids sorted by expert, each expert's run padded to whole blocks with the sentinel
    ``T*k``: int32 ``[blocks * BLOCK_M]``; each block's expert, -1 when unused: int32 ``[blocks]``).
    Static sizes, device ops only."""
    flat = ids.reshape(-1)
    num_pairs = flat.numel()
    dev = flat.device
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    experts = torch.arange(n_experts, device=dev, dtype=flat.dtype)
    # run starts by binary search in the sorted ids (torch.bincount on CUDA reads its max on the host)
    start = torch.searchsorted(sorted_ids, experts)
    count = torch.searchsorted(sorted_ids, experts, right=True) - start
    padded = (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = torch.cumsum(padded, 0)
    dest = (padded_end - padded)[sorted_ids] + torch.arange(num_pairs, device=dev) - start[sorted_ids]
    blocks = triton.cdiv(num_pairs + n_experts * (BLOCK_M - 1), BLOCK_M)
    pairs = torch.full((blocks * BLOCK_M,), num_pairs, dtype=torch.int32, device=dev)
    pairs.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(blocks, device=dev, dtype=padded_end.dtype) * BLOCK_M
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return pairs, block_expert


def _grouped_gemm(
    x: torch.Tensor,
    weight,
    pairs: torch.Tensor,
    block_expert: torch.Tensor,
    num_pairs: int,
    x_row_div: int,
    out: torch.Tensor,
) -> None:
    """out ``[num_pairs, N]`` (row p) = x[p // x_row_div] @ expert(p)'s W.T."""
    n, k = weight.shape[1], weight.shape[2]
    if isinstance(weight, PackedGPUExperts):
        planes, strides = weight.packed._args()
        dense, stride_wn, consts = out, 0, {"PACKED": True, **weight.packed._constexprs()}
    else:
        rows_flat = weight.stride(-1) == 1 and weight.stride(0) == n * weight.stride(1)
        dense = weight if rows_flat else weight.contiguous()
        planes, strides = (pairs, pairs, pairs, pairs), (0, 0, 0, 0)
        stride_wn = dense.stride(1)
        consts = {"PACKED": False, "HI_BITS": 0, "GROUP": 32, "ZERO": 0, "HAS_M": False}
    fp32 = x.dtype == torch.float32
    _moe_gemm_kernel[(block_expert.numel(), triton.cdiv(n, BLOCK_N))](
        x,
        dense,
        *planes,
        pairs,
        block_expert,
        out,
        num_pairs,
        x_row_div,
        n,
        k,
        x.stride(0),
        stride_wn,
        out.stride(0),
        *strides,
        IEEE=fp32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K_FP32 if fp32 else BLOCK_K,
        num_warps=4,
        **consts,
    )


def _kernel_weight(w) -> bool:
    return isinstance(w, PackedGPUExperts) or (isinstance(w, torch.Tensor) and w.dtype in _FLOAT)


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up,
    down,
    top_k: int,
    renormalize: bool,
    scoring: str = "softmax",
) -> torch.Tensor:
    """The reference's ``fused_moe`` with the expert MLPs as grouped GEMMs over tokens sorted by
    expert; ``gate_up`` and ``down`` are what ``prepare_expert_weights`` made (packed or plain)."""
    reference.check_shapes(x, router_logits, gate_up, down)
    if x.dtype not in _FLOAT or not _kernel_weight(gate_up) or not _kernel_weight(down):
        return reference.fused_moe(x, router_logits, gate_up, down, top_k, renormalize, scoring)
    weights, ids = reference.route(router_logits, top_k, renormalize, scoring)
    t, h = x.shape
    if t == 0:
        return torch.empty_like(x)
    n_experts, inter = down.shape[0], down.shape[2]
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_pairs = t * top_k
    pairs, block_expert = _sort_by_expert(ids, n_experts)
    gu = torch.empty(num_pairs, 2 * inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, gate_up, pairs, block_expert, num_pairs, top_k, gu)
    gate, up = gu.chunk(2, dim=-1)
    act = F.silu(gate) * up
    y = torch.empty(num_pairs, h, dtype=torch.float32, device=x.device)
    _grouped_gemm(act, down, pairs, block_expert, num_pairs, 1, y)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _combine_kernel[(t, triton.cdiv(h, COMBINE_BLOCK))](
        y, weights.contiguous(), out, h, TOP_K=top_k, BLOCK=COMBINE_BLOCK, num_warps=4
    )
    return out
