"""Each Numba kernel against the torch reference of its op on random inputs: lengths that
straddle block boundaries, awkward sizes, GQA ratios, sliding windows, int8 and fp8 caches."""

import random

import pytest
import torch

from tessera.kernels import reference
from tessera.kernels_cpu import paged_attention, reshape_and_cache
from tessera.kernels_cpu.attention import PREFILL_THRESHOLD

KV_DTYPES = [torch.float32, torch.int8, torch.float8_e4m3fn]


def make_batch(cases, hq, hk, d, block_size, kv_dtype, seed):
    """A cache holding each sequence's K/V (written by the reference) and the queries."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_blocks = sum(-(-total // block_size) for total, _ in cases) + 2
    free = list(range(n_blocks))
    rng.shuffle(free)
    cache = torch.zeros(2, n_blocks, block_size, hk, d, dtype=kv_dtype)
    quantized = kv_dtype in (torch.int8, torch.float8_e4m3fn)
    scales = torch.ones(2, n_blocks, block_size, hk) if quantized else None
    tables, queries = [], []
    for total, new in cases:
        table = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(total)])
        reference.reshape_and_cache(
            torch.randn(total, hk, d), torch.randn(total, hk, d), cache, slots, scales
        )
        queries.append(torch.randn(new, hq, d))
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = [0]
    for _, new in cases:
        qsl.append(qsl[-1] + new)
    return (
        torch.cat(queries),
        cache,
        torch.tensor(qsl, dtype=torch.int32),
        torch.tensor([t for t, _ in cases], dtype=torch.int32),
        bt,
        scales,
    )


MIXED = [(17, 17), (1, 1), (33, 1), (20, 7), (64, 1), (100, PREFILL_THRESHOLD + 3), (16, 1), (4097, 1)]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("hq,hk", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [None, 1, 5, 40])
@pytest.mark.parametrize("batch_invariant", [True, False])  # False: long runs through SDPA
def test_paged_attention_matches_the_reference(kv_dtype, hq, hk, block_size, window, batch_invariant):
    batch = make_batch(MIXED, hq, hk, 32, block_size, kv_dtype, seed=hq * 7 + block_size)
    q, cache, qsl, lens, bt, scales = batch
    ours = paged_attention(q, cache, qsl, lens, bt, 0.17, window, scales, batch_invariant)
    ref = reference.paged_attention(q, cache, qsl, lens, bt, 0.17, window, scales)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 9])
def test_paged_attention_in_bfloat16_matches_the_reference(window):
    q, cache, qsl, lens, bt, _ = make_batch(MIXED[:-1], 9, 3, 64, 16, torch.bfloat16, seed=11)
    q = q.to(torch.bfloat16)
    ours = paged_attention(q, cache, qsl, lens, bt, 0.125, window)
    ref = reference.paged_attention(q, cache, qsl, lens, bt, 0.125, window)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_paged_attention_with_head_dim_64_and_a_decode_only_batch():
    cases = [(n, 1) for n in (1, 15, 16, 17, 31, 32, 33, 200)]
    q, cache, qsl, lens, bt, scales = make_batch(cases, 9, 3, 64, 16, torch.float32, seed=3)
    ours = paged_attention(q, cache, qsl, lens, bt, 0.125, None, scales)
    torch.testing.assert_close(
        ours, reference.paged_attention(q, cache, qsl, lens, bt, 0.125), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("n_tokens", [1, 17, 130])
def test_reshape_and_cache_writes_what_the_reference_writes(kv_dtype, n_tokens):
    torch.manual_seed(n_tokens)
    hk, d, bs, nb = 3, 64, 16, 12
    key, value = torch.randn(n_tokens, hk, d) * 3, torch.randn(n_tokens, hk, d)
    slots = torch.randperm(nb * bs)[:n_tokens]
    caches = []
    for fn in (reshape_and_cache, reference.reshape_and_cache):
        cache = torch.zeros(2, nb, bs, hk, d, dtype=kv_dtype)
        scales = torch.zeros(2, nb, bs, hk) if kv_dtype != torch.float32 else None
        fn(key, value, cache, slots, scales)
        caches.append((cache, scales))
    (a, sa), (b, sb) = caches
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if sa is not None:
        assert torch.equal(sa, sb)


def test_the_cpu_backend_is_registered_through_the_entry_point():
    from tessera.kernels import lookup

    assert lookup("paged_attention", "cpu") is paged_attention
    assert lookup("reshape_and_cache", "cpu") is reshape_and_cache


@pytest.mark.parametrize("n_tokens", [1, 17, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_rotary_and_silu_match_the_reference(n_tokens, dtype):
    from tessera.kernels_cpu import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul

    torch.manual_seed(n_tokens)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    x, r = torch.randn(n_tokens, 576, dtype=dtype), torch.randn(n_tokens, 576, dtype=dtype)
    w = torch.randn(576, dtype=dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), **tol)
    out, res = fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(res, ref_res, **tol)
    # q and k as views into one fused projection, as the model hands them over
    qkv = torch.randn(n_tokens, 9 * 64 + 2 * 3 * 64, dtype=dtype)
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    ang = torch.rand(n_tokens, 32) * 100
    got_q, got_k = rotary_embedding(q, k, ang.cos(), ang.sin(), 64)
    ref_q, ref_k = reference.rotary_embedding(q, k, ang.cos(), ang.sin(), 64)
    torch.testing.assert_close(got_q, ref_q, **tol)
    torch.testing.assert_close(got_k, ref_k, **tol)
    g = torch.randn(n_tokens, 2 * 1536, dtype=dtype)
    torch.testing.assert_close(silu_and_mul(g), reference.silu_and_mul(g), **tol)
