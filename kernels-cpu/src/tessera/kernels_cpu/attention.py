"""Paged attention on the CPU: for bf16, one C kernel (AVX512-BF16 flash attention) for every
sequence; otherwise a Numba kernel, and with ``batch_invariant=False`` torch's fused SDPA for
long query runs (faster, but its results for a token depend on the length of the run it rides
in, so a request's tokens could depend on chunking and on the prefix cache)."""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
import torch.nn.functional as F

from tessera.kernels.reference import gather_kv
from tessera.kernels.reference import paged_attention as reference_paged_attention

from . import native

# Sequences with at least this many new tokens this step go through SDPA (measured crossover
# on a 2-core machine; see tools/bench/kernels.py).
PREFILL_THRESHOLD = 24

MODE_FLOAT, MODE_INT8, MODE_TABLE = 0, 1, 2


def _decode_table(dtype: torch.dtype, bits: int) -> np.ndarray:
    """float32 value of every bit pattern of a small float type (numpy has neither fp8 nor bf16)."""
    raw = torch.arange(2**bits, dtype=torch.int32)
    raw = raw.to(torch.uint8) if bits == 8 else raw.to(torch.int16)  # wraps to the same bits
    return raw.view(dtype).float().numpy()


FP8_TABLE = _decode_table(torch.float8_e4m3fn, 8)
BF16_TABLE = _decode_table(torch.bfloat16, 16)
_NO_SCALES = np.zeros((1, 1, 1), dtype=np.float32)
_UNIT_SCALES: dict[tuple, np.ndarray] = {}


def _unit_scales(shape: tuple) -> np.ndarray:
    """Scales of 1 for a table-decoded cache without scales (bf16): broadcast, not allocated."""
    if shape not in _UNIT_SCALES:
        _UNIT_SCALES[shape] = np.broadcast_to(np.ones(1, dtype=np.float32), shape)
    return _UNIT_SCALES[shape]


@nb.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _decode_attention(
    q,
    k_cache,
    v_cache,
    k_scales,
    v_scales,
    table,
    mode,
    qsl,
    seq_lens,
    block_tables,
    selected,
    scale,
    window,
    out,
):
    """One work item per (query token, KV head): the K/V of that head are read once for the
    whole group of query heads sharing it, with an online softmax."""
    n_tokens, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    n_seqs = seq_lens.shape[0]
    token_seq = np.empty(n_tokens, dtype=np.int64)
    for i in range(n_seqs):
        for t in range(qsl[i], qsl[i + 1]):
            token_seq[t] = i
    for item in nb.prange(n_tokens * hk):
        t = item // hk
        kh = item % hk
        i = token_seq[t]
        if not selected[i]:
            continue
        seq_len = seq_lens[i]
        pos = seq_len - (qsl[i + 1] - qsl[i]) + (t - qsl[i])
        lo = 0
        if window > 0:
            lo = max(0, pos - window + 1)
        m = np.full(group, -np.inf, dtype=np.float32)
        s_sum = np.zeros(group, dtype=np.float32)
        acc = np.zeros((group, d), dtype=np.float32)
        qv = np.empty((group, d), dtype=np.float32)
        for g in range(group):
            for x in range(d):
                qv[g, x] = q[t, kh * group + g, x] * scale
        kf = np.empty(d, dtype=np.float32)
        vf = np.empty(d, dtype=np.float32)
        for j in range(lo, pos + 1):
            blk = block_tables[i, j // bs]
            off = j % bs
            if mode == 0:
                for x in range(d):
                    kf[x] = k_cache[blk, off, kh, x]
                    vf[x] = v_cache[blk, off, kh, x]
            elif mode == 1:
                ks = k_scales[blk, off, kh]
                vs = v_scales[blk, off, kh]
                for x in range(d):
                    kf[x] = np.float32(k_cache[blk, off, kh, x]) * ks
                    vf[x] = np.float32(v_cache[blk, off, kh, x]) * vs
            else:
                ks = k_scales[blk, off, kh]
                vs = v_scales[blk, off, kh]
                for x in range(d):
                    kf[x] = table[np.int64(k_cache[blk, off, kh, x])] * ks
                    vf[x] = table[np.int64(v_cache[blk, off, kh, x])] * vs
            for g in range(group):
                s = np.float32(0.0)
                for x in range(d):
                    s += qv[g, x] * kf[x]
                if s > m[g]:
                    corr = np.exp(m[g] - s)
                    s_sum[g] *= corr
                    for x in range(d):
                        acc[g, x] *= corr
                    m[g] = s
                p = np.exp(s - m[g])
                s_sum[g] += p
                for x in range(d):
                    acc[g, x] += p * vf[x]
        for g in range(group):
            inv = 1.0 / s_sum[g]
            for x in range(d):
                out[t, kh * group + g, x] = acc[g, x] * inv


def _sdpa_one(query, kv_cache, kv_scales, table_row, first_q, seq_len, scale, window):
    """One long query run through torch's fused attention over its gathered blocks."""
    d = kv_cache.shape[4]
    lo = 0 if window is None else max(0, first_q - window + 1)
    k, v = gather_kv(kv_cache, kv_scales, table_row, lo, seq_len, query.dtype)
    nq = query.shape[0]
    mask = None  # a whole prompt at once: the fused kernel's own causal mask skips the upper triangle
    if first_q > 0 or window is not None:
        q_pos = torch.arange(first_q, seq_len)[:, None]
        k_pos = torch.arange(lo, seq_len)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(nq, -1, d)


def _c_kernel_takes(query: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> bool:
    """bf16 queries and cache, head size a multiple of 32 up to 256, at most 64 query heads per
    KV head, a positive scale."""
    return (
        query.dtype == torch.bfloat16
        and kv_cache.dtype == torch.bfloat16
        and query.dim() == 3
        and kv_cache.is_contiguous()
        and kv_cache.shape[4] % 32 == 0
        and kv_cache.shape[4] <= 256
        and query.shape[1] % kv_cache.shape[3] == 0
        and query.shape[1] // kv_cache.shape[3] <= 64
        and scale > 0
    )


def _native_bf16(lib, query, kv_cache, qsl, lens, block_tables, seqs, scale, window, out) -> None:
    """The given sequences of the step in one call of the AVX512-BF16 flash-attention kernel."""
    q = query.contiguous()
    qsl32 = np.ascontiguousarray(qsl, dtype=np.int32)
    lens32 = np.ascontiguousarray(lens, dtype=np.int32)
    tables = np.ascontiguousarray(block_tables.numpy(), dtype=np.int32)
    seqs32 = np.ascontiguousarray(seqs, dtype=np.int32)
    _, _, block_size, kv_heads, head_size = kv_cache.shape
    rc = lib.tessera_attention_bf16(
        q.data_ptr(),
        kv_cache[0].data_ptr(),
        kv_cache[1].data_ptr(),
        qsl32.ctypes.data,
        lens32.ctypes.data,
        tables.ctypes.data,
        tables.shape[1],
        seqs32.ctypes.data,
        len(seqs32),
        q.shape[1],
        kv_heads,
        head_size,
        block_size,
        float(scale),
        int(window or 0),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc == -3:
        raise MemoryError("the bf16 attention kernel could not allocate its scratch memory")
    if rc != 0:
        raise ValueError(f"the bf16 attention kernel refused its arguments (code {rc})")


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    kv_scales: torch.Tensor | None = None,
    batch_invariant: bool = True,
    max_query_len: int | None = None,  # host bounds for GPU grids; the CPU reads the lengths
    max_seq_len: int | None = None,
) -> torch.Tensor:
    if query.dtype not in (torch.float32, torch.bfloat16) or kv_cache.dtype == torch.float16:
        return reference_paged_attention(
            query, kv_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window, kv_scales
        )
    qsl = query_start_loc.numpy()
    lens = seq_lens.numpy()
    if _c_kernel_takes(query, kv_cache, scale) and (lib := native.library()) is not None:
        # bf16: the C kernel is faster than the Numba one for decodes too (tools/bench/kernels.py),
        # and batch-invariant at no cost
        out = torch.empty_like(query)
        _native_bf16(
            lib, query, kv_cache, qsl, lens, block_tables, np.arange(len(lens)), scale, sliding_window, out
        )
        return out
    n_new = np.diff(qsl)
    # the Numba kernel computes each token alone (the same bits in any run); SDPA's blocking
    # follows the run's length
    long_runs = np.zeros_like(n_new, dtype=bool) if batch_invariant else n_new >= PREFILL_THRESHOLD
    out = torch.empty_like(query)
    if not long_runs.all():
        table = FP8_TABLE
        if kv_cache.dtype == torch.int8:
            mode, k_c, v_c = MODE_INT8, kv_cache[0].numpy(), kv_cache[1].numpy()
        elif kv_cache.dtype == torch.float8_e4m3fn:
            raw = kv_cache.view(torch.uint8)
            mode, k_c, v_c = MODE_TABLE, raw[0].numpy(), raw[1].numpy()
        elif kv_cache.dtype == torch.bfloat16:
            raw = kv_cache.view(torch.int16)
            mode, k_c, v_c, table = (
                MODE_TABLE,
                raw[0].numpy().view(np.uint16),
                raw[1].numpy().view(np.uint16),
                BF16_TABLE,
            )
        else:
            mode, k_c, v_c = MODE_FLOAT, kv_cache[0].numpy(), kv_cache[1].numpy()
        if mode == MODE_FLOAT:
            k_s = v_s = _NO_SCALES
        elif kv_scales is None:
            k_s = v_s = _unit_scales(k_c.shape[:3])
        else:
            k_s, v_s = kv_scales[0].numpy(), kv_scales[1].numpy()
        q_np = query.float().contiguous().numpy()
        out_np = out.numpy() if out.dtype == torch.float32 else np.empty(q_np.shape, dtype=np.float32)
        _decode_attention(
            q_np,
            k_c,
            v_c,
            k_s,
            v_s,
            table,
            mode,
            qsl,
            lens,
            block_tables.numpy(),
            ~long_runs,
            np.float32(scale),
            sliding_window or 0,
            out_np,
        )
        if out.dtype != torch.float32:
            out.copy_(torch.from_numpy(out_np))
    for i in np.nonzero(long_runs)[0]:
        q0, q1 = int(qsl[i]), int(qsl[i + 1])
        seq_len = int(lens[i])
        out[q0:q1] = _sdpa_one(
            query[q0:q1],
            kv_cache,
            kv_scales,
            block_tables[i],
            seq_len - (q1 - q0),
            seq_len,
            scale,
            sliding_window,
        )
    return out
