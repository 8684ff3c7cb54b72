"""Paged attention and the KV cache write in Triton, for mixed prefill and decode steps.

``reshape_and_cache``: one program per (token, KV head) writes that head's K and V row into its slot
(``block_id * block_size + offset``; a negative slot is skipped, as the CPU kernels do). An int8 or
fp8 cache is quantized in the same pass with the reference's per-(token, head) absmax scale and
rounding (int8: round half to even; fp8 e4m3fn: round to nearest even, encoded with integer ops so
the kernel needs no fp8 hardware).

``paged_attention``: one kernel serves prefill chunks and decode rows.

- Grid ``(query tiles, KV heads, partitions)``. A query tile is ``TQ = BLOCK_M // G`` consecutive
  query tokens of one sequence times the ``G = Hq / Hk`` query heads of one KV head (GQA packed into
  the rows, so a K/V tile is loaded once for the whole group). Tiles sit at absolute positions
  (tile ``t`` of a sequence holds positions ``[t * TQ, (t + 1) * TQ)``), so a token has the same
  row whatever the chunking. A sequence's tiles have global indices from
  ``query_start_loc[i] // TQ + 2 i``; the grid is the bound ``T // TQ + 2 B`` and a program finds
  its sequence by binary search, so launching needs no device-to-host copy.
- Keys are walked in tiles of ``BLOCK_N`` at absolute positions (multiples of ``BLOCK_N``) through
  the block table, with an online softmax in fp32 (exp2 domain). Masks: causal by absolute
  position (a sequence's queries are its last tokens, position ``seq_len - n_queries + i``),
  sliding window ``p - W < j <= p``; whole key tiles outside every row's window are skipped, and
  nothing outside ``[first visible key, seq_len)`` is read, so unused block-table entries may hold
  any id. int8/fp8 K/V are dequantized in registers with their scales.
- Split-K (flash-decoding): keys are cut into partitions of ``PARTITION`` positions at fixed
  absolute boundaries (multiples of ``PARTITION``). Each partition is reduced from a fresh state
  ``(m, den, acc)``; partitions are then folded in increasing order into ``(M, L, A)`` and the row's
  output is ``A / L``. A single-tile sequence (a decode row, a short chunk) may run each partition
  in its own program (partials in a scratch buffer, folded by ``_reduce_kernel``); any other tile
  folds its partitions in a loop in one program. Both paths run the same arithmetic (the same
  helpers, explicit FMAs, no FP contraction), so which one a tile takes is free to depend on load.
- Batch invariance: a row's reduction order is fixed by its own position alone (key tile size,
  partition boundaries, order). Tiles and partitions that hold no key a row may see leave its
  state unchanged to the bit (the running max starts at a finite ``-1e30``, masked loads give
  zeros, so such a step multiplies by ``exp2(0) = 1`` and adds ``0``), and the matmul shapes are the
  same for every launch. So a row's output does not depend on the other rows of the step, on how
  its prompt was chunked, or on prefill vs decode. With ``batch_invariant=False`` the layout
  follows the load: smaller partitions when few programs would run, and 64-row query tiles (8
  warps) for a step of ``PREFILL_TOKENS`` tokens or more, so a K/V tile serves 4x the rows.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tessera.kernels.reference import FP8_E4M3_MAX, INT8_MAX, is_quantized_kv

# Keys per partition: fixed absolute boundaries, the unit of split-K. A multiple of BLOCK_N.
PARTITION = 512
# Keys per tile inside a partition (halved for an fp32 query, whose tiles are twice the registers;
# no spills at D = 128 on sm_80/sm_90); query rows per tile (query tokens x GQA group).
BLOCK_N = 64
BLOCK_M = 16
# Split a single-tile sequence's partitions across programs only when fewer programs than this
# would run otherwise (a small decode batch cannot fill the GPU), and the scratch fits the budget.
SPLIT_PROGRAMS_BELOW = 1024
SPLIT_SCRATCH_BYTES = 256 << 20
NUM_WARPS = 4
# batch_invariant=False only: steps with this many tokens use 64-row query tiles.
PREFILL_TOKENS = 512
PREFILL_BLOCK_M = 64
PREFILL_NUM_WARPS = 8

_QUANT_NONE, _QUANT_INT8, _QUANT_FP8 = 0, 1, 2
_FLOAT_CACHES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# fp8 e4m3fn <-> float32 with integer ops (bit-exact with torch's casts, any GPU)


@triton.jit
def _fp8_to_f32(b):
    """uint8 codes of float8_e4m3fn -> float32 values (codes of NaN are never written)."""
    b = b.to(tl.int32) & 0xFF
    sign = (b >> 7) & 1
    e = (b >> 3) & 15
    m = b & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # 2^-9: the subnormal step
    sub = tl.where(sign == 1, -sub, sub)
    return tl.where(e == 0, sub, normal)


@triton.jit
def _round_half_even(t):
    """Round float32 ``t`` (|t| < 2^23) to the nearest integer, ties to even, exactly."""
    f = tl.floor(t)
    frac = t - f  # exact: f and t share the exponent range
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _f32_to_fp8(y):
    """float32 values in [-448, 448] -> uint8 codes of float8_e4m3fn, round to nearest even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(y)
    ex = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # subnormals share the exponent -6
    qe = ex - 3  # e4m3 keeps 3 mantissa bits: the quantum is 2^(ex - 3)
    down = ((127 - qe) << 23).to(tl.float32, bitcast=True)
    up = ((127 + qe) << 23).to(tl.float32, bitcast=True)
    v = _round_half_even(a * down) * up  # exact products by powers of two
    vbits = v.to(tl.int32, bitcast=True)
    normal_code = ((((vbits >> 23) & 0xFF) - 120) << 3) | ((vbits >> 20) & 7)
    sub_code = (v * 512.0).to(tl.int32)
    code = tl.where(v >= 0.015625, normal_code, sub_code)  # 2^-6: smallest normal
    return ((sign << 7) | code).to(tl.uint8)


# ---------------------------------------------------------------------------------------------
# reshape_and_cache


@triton.jit
def _cache_write_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    scales_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c0,
    stride_cb,
    stride_co,
    stride_ch,
    stride_s0,
    stride_sb,
    stride_so,
    BLOCK_SIZE: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding: not written
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_D
    dst = cache_ptr + blk * stride_cb + off * stride_co + h * stride_ch + d
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=dmask, other=0.0)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=dmask, other=0.0)
    if QUANT == 0:
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=dmask)
        tl.store(dst + stride_c0, v.to(cache_ptr.dtype.element_ty), mask=dmask)
    else:
        sdst = scales_ptr + blk * stride_sb + off * stride_so + h
        for which in tl.static_range(2):
            x = k.to(tl.float32) if which == 0 else v.to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8)
            scale = tl.math.div_rn(amax, QMAX)
            y = tl.math.div_rn(x, scale)
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
            if QUANT == 1:
                q = _round_half_even(y).to(tl.int8)
            else:
                q = _f32_to_fp8(y)
            tl.store(dst + which * stride_c0, q, mask=dmask)
            tl.store(sdst + which * stride_s0, scale)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Write key/value ``[T, Hk, D]`` into their slots of ``kv_cache`` ``[2, nb, bs, Hk, D]``.

    int8/fp8 caches are quantized here and ``kv_scales`` ``[2, nb, bs, Hk]`` gets the scales.
    """
    t, hk, d = key.shape
    _, _, bs, chk, cd = kv_cache.shape
    if value.shape != key.shape or (chk, cd) != (hk, d):
        raise ValueError(
            f"reshape_and_cache: key {tuple(key.shape)} / value {tuple(value.shape)} do not fit the "
            f"cache {tuple(kv_cache.shape)}"
        )
    if t == 0:
        return
    quant = _quant_mode(kv_cache, kv_scales)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    cache = kv_cache.view(torch.uint8) if quant == _QUANT_FP8 else kv_cache
    scales = kv_scales if quant != _QUANT_NONE else kv_cache  # unused pointer when not quantized
    s_strides = kv_scales.stride()[:3] if quant != _QUANT_NONE else (0, 0, 0)
    _cache_write_kernel[(t, hk)](
        key,
        value,
        cache,
        scales,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        *s_strides,
        BLOCK_SIZE=bs,
        HEAD_D=d,
        BLOCK_D=triton.next_power_of_2(d),
        QUANT=quant,
        QMAX=INT8_MAX if quant == _QUANT_INT8 else FP8_E4M3_MAX,
        num_warps=1 if d <= 128 else 2,
    )


def _quant_mode(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> int:
    if is_quantized_kv(kv_cache.dtype):
        if kv_scales is None or kv_scales.dtype != torch.float32 or kv_scales.shape != kv_cache.shape[:4]:
            raise ValueError(
                f"a {kv_cache.dtype} KV cache needs float32 kv_scales of shape {tuple(kv_cache.shape[:4])}"
            )
        if kv_scales.stride(-1) != 1:
            raise ValueError("kv_scales must be contiguous in its last dimension")
        return _QUANT_INT8 if kv_cache.dtype == torch.int8 else _QUANT_FP8
    if kv_cache.dtype not in _FLOAT_CACHES:
        raise ValueError(f"KV cache dtype {kv_cache.dtype} is not supported (float32/16, bf16, int8, fp8)")
    if kv_cache.stride(-1) != 1:
        raise ValueError("the KV cache must be contiguous in its last dimension")
    return _QUANT_NONE


# ---------------------------------------------------------------------------------------------
# paged_attention


@triton.jit
def _fold(M, L, A, m, den, acc):
    """Fold one partition's (max, sum, out) into the running state; explicit FMAs so every kernel
    that folds gets the same bits."""
    new_m = tl.maximum(M, m)
    a = tl.exp2(M - new_m)
    b = tl.exp2(m - new_m)
    L = tl.fma(L, a, den * b)
    A = tl.fma(A, a[:, None], acc * b[:, None])
    return new_m, L, A


@triton.jit
def _partition(
    q,
    pos,
    k_base,
    v_base,
    ks_base,
    vs_base,
    bt_row,
    part,
    kv_lo,
    kv_hi,
    qk_scale,
    window,
    stride_kb,
    stride_ko,
    stride_sb,
    stride_so,
    d,
    dmask,
    HAS_WINDOW: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTITION: tl.constexpr,
    QUANT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax of the query tile over the keys of one partition that lie in [kv_lo, kv_hi),
    from a fresh state. Returns (m, den, acc) in fp32, exp2 domain."""
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_lo = part * PARTITION
    n0 = tl.maximum(p_lo, (kv_lo // BLOCK_N) * BLOCK_N)
    n1 = tl.minimum(p_lo + PARTITION, kv_hi)
    for n in range(n0, n1, BLOCK_N):
        kpos = n + tl.arange(0, BLOCK_N)
        kvalid = (kpos >= kv_lo) & (kpos < kv_hi)
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=kvalid, other=0).to(tl.int64)
        row = blk * stride_kb + (kpos % BLOCK_SIZE) * stride_ko
        lmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(k_base + row[:, None] + d[None, :], mask=lmask, other=0)
        # int8 and e4m3 codes are exact in fp16/bf16/fp32: the per-key scales go on the score
        # columns and on p instead of on every element of the tiles
        if QUANT == 2:
            k = _fp8_to_f32(k)
        k = k.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if QUANT != 0:
            srow = blk * stride_sb + (kpos % BLOCK_SIZE) * stride_so
            k_s = tl.load(ks_base + srow, mask=kvalid, other=0.0)
            qk = qk * (k_s * qk_scale)[None, :]
        else:
            qk = qk * qk_scale
        allowed = kvalid[None, :] & (kpos[None, :] <= pos[:, None])
        if HAS_WINDOW:
            allowed &= kpos[None, :] > pos[:, None] - window
        qk = tl.where(allowed, qk, float("-inf"))
        new_m = tl.maximum(m, tl.max(qk, axis=1))
        alpha = tl.exp2(m - new_m)
        p = tl.exp2(qk - new_m[:, None])
        den = tl.fma(den, alpha, tl.sum(p, axis=1))
        acc = acc * alpha[:, None]
        # V loaded after the scores: K and V tiles are not both live in registers
        v = tl.load(v_base + row[:, None] + d[None, :], mask=lmask, other=0)
        if QUANT == 2:
            v = _fp8_to_f32(v)
        v = v.to(q.dtype)
        if QUANT != 0:
            v_s = tl.load(vs_base + srow, mask=kvalid, other=0.0)
            p_v = (p * v_s[None, :]).to(q.dtype)
        else:
            p_v = p.to(q.dtype)
        acc = tl.dot(p_v, v, acc, input_precision=PRECISION)
        m = new_m
    return m, den, acc


@triton.jit
def _attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    out_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    qsl_ptr,
    seq_lens_ptr,
    bt_ptr,
    num_seqs,
    search_iters,
    qk_scale,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_sb,
    stride_so,
    stride_bt,
    stride_ps,
    stride_ph,
    stride_pp,
    GROUP: tl.constexpr,
    TQ: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTITION: tl.constexpr,
    QUANT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)

    # the sequence whose tiles start at or before this one: start(i) = qsl[i] // TQ + 2 i
    lo = 0
    hi = num_seqs - 1
    for _ in range(search_iters):
        mid = (lo + hi + 1) // 2
        ok = tl.load(qsl_ptr + mid) // TQ + 2 * mid <= tile
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    seq = lo
    q_begin = tl.load(qsl_ptr + seq)
    q_end = tl.load(qsl_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - (q_end - q_begin)
    # tiles sit at absolute positions (multiples of TQ): a token keeps its row in any chunking
    base = first_pos - first_pos % TQ + (tile - (q_begin // TQ + 2 * seq)) * TQ
    if (base >= seq_len) or (q_end == q_begin):
        return

    rows = tl.arange(0, BLOCK_M)
    pos = base + rows // GROUP
    tok = q_begin + (pos - first_pos)
    row_ok = (rows < TQ * GROUP) & (pos >= first_pos) & (pos < seq_len)
    head = kvh * GROUP + rows % GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_D

    # keys any row of the tile may see; partitions are at absolute positions
    tile_first = tl.maximum(base, first_pos)
    kv_hi = tl.minimum(base + TQ, seq_len)
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(tile_first - window + 1, 0)
    part_lo = kv_lo // PARTITION
    part_hi = (kv_hi - 1) // PARTITION + 1
    split = SPLIT and (first_pos % TQ + (q_end - q_begin) <= TQ) and (part_hi - part_lo > 1)
    if split:
        if (part < part_lo) or (part >= part_hi):
            return
    elif part > 0:
        return

    q_off = tok.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_kh
    ks_base = ks_ptr + kvh
    vs_base = vs_ptr + kvh
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

    if split:
        m, den, acc = _partition(
            q, pos, k_base, v_base, ks_base, vs_base, bt_row, part, kv_lo, kv_hi, qk_scale, window,
            stride_kb, stride_ko, stride_sb, stride_so, d, dmask,
            HAS_WINDOW, BLOCK_SIZE, BLOCK_M, BLOCK_N, BLOCK_D, PARTITION, QUANT, PRECISION,
        )  # fmt: skip
        pbase = seq.to(tl.int64) * stride_ps + kvh * stride_ph + part * stride_pp
        tl.store(pm_ptr + pbase // BLOCK_D + rows, m)
        tl.store(pl_ptr + pbase // BLOCK_D + rows, den)
        tl.store(pacc_ptr + pbase + rows[:, None] * BLOCK_D + d[None, :], acc)
    else:
        M = tl.full([BLOCK_M], -1.0e30, tl.float32)
        L = tl.zeros([BLOCK_M], tl.float32)
        A = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for p in range(part_lo, part_hi):
            m, den, acc = _partition(
                q, pos, k_base, v_base, ks_base, vs_base, bt_row, p, kv_lo, kv_hi, qk_scale, window,
                stride_kb, stride_ko, stride_sb, stride_so, d, dmask,
                HAS_WINDOW, BLOCK_SIZE, BLOCK_M, BLOCK_N, BLOCK_D, PARTITION, QUANT, PRECISION,
            )  # fmt: skip
            M, L, A = _fold(M, L, A, m, den, acc)
        out = A / tl.where(L > 0, L, 1.0)[:, None]  # L is 0 only on padding rows
        o_off = tok.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(
            out_ptr + o_off[:, None] + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dmask[None, :],
        )


@triton.jit
def _reduce_kernel(
    out_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    qsl_ptr,
    seq_lens_ptr,
    window,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_ph,
    stride_pp,
    GROUP: tl.constexpr,
    TQ: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTITION: tl.constexpr,
):
    """Fold the partitions of the single-tile sequences that ``_attn_kernel`` split, in order."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    q_begin = tl.load(qsl_ptr + seq)
    q_end = tl.load(qsl_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - (q_end - q_begin)
    if (q_end == q_begin) or (first_pos % TQ + (q_end - q_begin) > TQ):  # not a single-tile sequence
        return
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
    part_lo = kv_lo // PARTITION
    part_hi = (seq_len - 1) // PARTITION + 1
    if part_hi - part_lo <= 1:
        return
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    M = tl.full([BLOCK_M], -1.0e30, tl.float32)
    L = tl.zeros([BLOCK_M], tl.float32)
    A = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for p in range(part_lo, part_hi):
        pbase = seq.to(tl.int64) * stride_ps + kvh * stride_ph + p * stride_pp
        m = tl.load(pm_ptr + pbase // BLOCK_D + rows)
        den = tl.load(pl_ptr + pbase // BLOCK_D + rows)
        acc = tl.load(pacc_ptr + pbase + rows[:, None] * BLOCK_D + d[None, :])
        M, L, A = _fold(M, L, A, m, den, acc)
    out = A / tl.where(L > 0, L, 1.0)[:, None]  # L is 0 only on padding rows
    pos = first_pos - first_pos % TQ + rows // GROUP
    tok = q_begin + (pos - first_pos)
    row_ok = (rows < TQ * GROUP) & (pos >= first_pos) & (pos < seq_len)
    head = kvh * GROUP + rows % GROUP
    o_off = tok.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + o_off[:, None] + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (d < HEAD_D)[None, :],
    )


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def split_plan(
    programs: int,
    num_seqs: int,
    hk: int,
    max_len: int,
    block_m: int,
    block_d: int,
    device: torch.device,
    batch_invariant: bool,
) -> tuple[int, int, bool]:
    """(partition size, partitions bound, whether single-tile sequences split their partitions
    across programs). The partition size is fixed when ``batch_invariant``; the split never
    changes a result, so it follows the load: only when few programs would run otherwise."""
    partition = PARTITION
    if not batch_invariant and programs < SPLIT_PROGRAMS_BELOW:
        want = max(1, (2 * _num_sms(device)) // programs)
        partition = max(BLOCK_N, min(PARTITION * 8, triton.next_power_of_2(triton.cdiv(max_len, want))))
    n_parts = triton.cdiv(max_len, partition)
    scratch = num_seqs * hk * n_parts * block_m * (block_d + 2) * 4
    split = n_parts > 1 and programs < SPLIT_PROGRAMS_BELOW and scratch <= SPLIT_SCRATCH_BYTES
    return partition, n_parts, split


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
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch over the paged cache (see ``tessera.kernels.reference``).

    ``max_seq_len`` (the metadata builder's host bound; the captured bound in a CUDA graph)
    narrows the partitions launched; without it the block table's width bounds every length.
    ``max_query_len`` is not needed: query tiles are bounded by the token count."""
    t, hq, d = query.shape
    _, _, bs, hk, cd = kv_cache.shape
    b = seq_lens.shape[0]
    if cd != d or hq % hk != 0:
        raise ValueError(
            f"paged_attention: query {tuple(query.shape)} does not fit the cache {tuple(kv_cache.shape)}"
        )
    if d > 256:
        raise ValueError(f"paged_attention: head size {d} is above the supported 256")
    if query.dtype not in _FLOAT_CACHES:
        raise ValueError(f"paged_attention: query dtype {query.dtype} is not supported")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"paged_attention: sliding_window must be >= 1, got {sliding_window}")
    quant = _quant_mode(kv_cache, kv_scales)
    out = torch.empty_like(query)
    if t == 0 or b == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    group = hq // hk
    prefill = not batch_invariant and t >= PREFILL_TOKENS
    block_m = max(PREFILL_BLOCK_M if prefill else BLOCK_M, triton.next_power_of_2(group))
    num_warps = PREFILL_NUM_WARPS if prefill else NUM_WARPS
    tq = block_m // group
    block_d = max(16, triton.next_power_of_2(d))
    n_tiles = t // tq + 2 * b  # a bound: tiles past a sequence's last query exit at once

    max_len = block_tables.shape[1] * bs  # no device sync: the table's width bounds every seq_len
    if max_seq_len is not None:
        max_len = max(1, min(max_len, max_seq_len))
    partition, n_parts, split = split_plan(
        n_tiles * hk, b, hk, max_len, block_m, block_d, query.device, batch_invariant
    )
    block_n = BLOCK_N if query.element_size() <= 2 else BLOCK_N // 2
    if prefill and query.device.type == "cuda" and torch.cuda.get_device_capability(query.device)[0] < 9:
        block_n = min(block_n, 32)  # 64 x 64 tiles spill on sm_80 (no wgmma)
    if partition % block_n:
        raise ValueError(
            f"paged_attention: PARTITION {partition} is not a multiple of the key tile ({block_n})"
        )
    if split:
        pacc = torch.empty((b, hk, n_parts, block_m, block_d), dtype=torch.float32, device=query.device)
        pm = torch.empty((b, hk, n_parts, block_m), dtype=torch.float32, device=query.device)
        pl = torch.empty_like(pm)
    else:
        pacc = pm = pl = out  # unused
    # partials: m/den use the acc layout's offsets divided by BLOCK_D
    p_strides = (hk * n_parts * block_m * block_d, n_parts * block_m * block_d, block_m * block_d)

    k = kv_cache[0]
    v = kv_cache[1]
    if quant == _QUANT_FP8:
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    if quant != _QUANT_NONE:
        ks, vs = kv_scales[0], kv_scales[1]
        s_strides = (ks.stride(0), ks.stride(1))
    else:
        ks = vs = k
        s_strides = (0, 0)
    window = sliding_window or 0
    common = dict(GROUP=group, TQ=tq, HAS_WINDOW=sliding_window is not None, HEAD_D=d, BLOCK_M=block_m)
    _attn_kernel[(n_tiles, hk, n_parts if split else 1)](
        query,
        k,
        v,
        ks,
        vs,
        out,
        pm,
        pl,
        pacc,
        query_start_loc,
        seq_lens,
        block_tables,
        b,
        max(1, math.ceil(math.log2(b)) + 1) if b > 1 else 0,
        scale * math.log2(math.e),
        window,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        *s_strides,
        block_tables.stride(0),
        *p_strides,
        SPLIT=split,
        BLOCK_SIZE=bs,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PARTITION=partition,
        QUANT=quant,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        enable_fp_fusion=False,
        **common,
    )
    if split:
        _reduce_kernel[(b, hk)](
            out,
            pm,
            pl,
            pacc,
            query_start_loc,
            seq_lens,
            window,
            out.stride(0),
            out.stride(1),
            *p_strides,
            BLOCK_D=block_d,
            PARTITION=partition,
            num_warps=num_warps,
            enable_fp_fusion=False,
            **common,
        )
    return out
