"""reshape_and_cache on the CPU: K and V written (and int8-quantized) in one Numba pass."""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from tessera.kernels.reference import INT8_MAX, quantize_kv


@nb.njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _write(key, value, k_cache, v_cache, slots):
    bs = k_cache.shape[1]
    for t in nb.prange(key.shape[0]):
        s = slots[t]
        if s < 0:
            continue
        blk, off = s // bs, s % bs
        k_cache[blk, off] = key[t]
        v_cache[blk, off] = value[t]


@nb.njit(parallel=True, fastmath=False, cache=True, nogil=True)
def _write_int8(key, value, k_cache, v_cache, k_scales, v_scales, slots, qmax):
    bs = k_cache.shape[1]
    hk, d = key.shape[1], key.shape[2]
    for t in nb.prange(key.shape[0]):
        s = slots[t]
        if s < 0:
            continue
        blk, off = s // bs, s % bs
        for h in range(hk):
            for which in range(2):
                x = key[t, h] if which == 0 else value[t, h]
                amax = np.float32(1e-8)
                for i in range(d):
                    a = abs(x[i])
                    if a > amax:
                        amax = a
                scale = np.float32(amax / qmax)
                dst = k_cache[blk, off, h] if which == 0 else v_cache[blk, off, h]
                for i in range(d):
                    # x / scale in float32 then round half to even, as torch.round does
                    q = np.rint(np.float32(x[i] / scale))
                    dst[i] = np.int8(min(max(q, -qmax), qmax))
                if which == 0:
                    k_scales[blk, off, h] = scale
                else:
                    v_scales[blk, off, h] = scale


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    slots = slot_mapping.numpy()
    if kv_cache.dtype == torch.int8:
        _write_int8(
            key.float().contiguous().numpy(),
            value.float().contiguous().numpy(),
            kv_cache[0].numpy(),
            kv_cache[1].numpy(),
            kv_scales[0].numpy(),
            kv_scales[1].numpy(),
            slots,
            np.float32(INT8_MAX),
        )
        return
    if kv_cache.dtype == torch.float8_e4m3fn:
        # numpy has no fp8: quantize with torch (exactly as the reference), then move bytes
        kq, ks = quantize_kv(key, kv_cache.dtype)
        vq, vs = quantize_kv(value, kv_cache.dtype)
        raw = kv_cache.view(torch.uint8)
        _write(
            kq.view(torch.uint8).numpy(), vq.view(torch.uint8).numpy(), raw[0].numpy(), raw[1].numpy(), slots
        )
        _write(
            ks[..., None].numpy(),
            vs[..., None].numpy(),
            kv_scales[0, ..., None].numpy(),
            kv_scales[1, ..., None].numpy(),
            slots,
        )
        return
    if kv_cache.dtype in (torch.bfloat16, torch.float16) and key.dtype == kv_cache.dtype:
        # numpy has no bf16: the same bytes moved as int16
        raw = kv_cache.view(torch.int16)
        _write(
            key.contiguous().view(torch.int16).numpy(),
            value.contiguous().view(torch.int16).numpy(),
            raw[0].numpy(),
            raw[1].numpy(),
            slots,
        )
        return
    if kv_cache.dtype == torch.float32 and key.dtype == kv_cache.dtype:
        _write(
            key.contiguous().numpy(),
            value.contiguous().numpy(),
            kv_cache[0].numpy(),
            kv_cache[1].numpy(),
            slots,
        )
        return
    from tessera.kernels.reference import reshape_and_cache as ref

    ref(key, value, kv_cache, slot_mapping, kv_scales)
