"""The C (AVX512-BF16) kernels against references computed in float64 from the same bf16 inputs,
and bit for bit against the torch reference where they round as it rounds."""

import random

import pytest
import torch

from tessera.kernels import reference
from tessera.kernels_cpu import attention, elementwise, native, paged_attention, reshape_and_cache

from .test_against_reference import make_batch

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler or no AVX512-BF16 on this CPU (the Numba/torch path runs)"
)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def native_calls(monkeypatch) -> list:
    calls = []
    real = attention._native_bf16

    def spy(*args, **kwargs):
        calls.append(args[6])  # the sequences it ran
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_native_bf16", spy)
    return calls


# (total length, new tokens): whole prompts, chunks that start mid-sequence, runs that straddle
# the 64-key tiles and the row tiles (16 rows), a sequence with nothing new this step, decodes
CASES = [
    (17, 17),
    (1, 1),
    (100, 27),
    (64, 64),
    (65, 65),
    (130, 40),
    (300, 299),
    (33, 1),
    (700, 650),
    (50, 0),
    # decode-sized runs (the kernel's decode layout): 1-4 new tokens, keys straddling 16 and 64
    (16, 1),
    (17, 2),
    (65, 4),
    (200, 3),
    (129, 1),
]


@pytest.mark.parametrize(
    "hq,hk,d,block_size,window",
    [
        (9, 3, 64, 16, None),
        (9, 3, 64, 16, 5),
        (9, 3, 64, 16, 100),
        (8, 1, 128, 1, None),
        (4, 4, 32, 5, 40),
        (16, 1, 64, 7, None),
        (6, 2, 96, 16, 1),
        (32, 2, 64, 16, None),
        (32, 1, 64, 16, 20),  # 32 heads per KV head: decodes take the tile layout
    ],
)
def test_attention_matches_float64(monkeypatch, hq, hk, d, block_size, window):
    calls = native_calls(monkeypatch)
    q, cache, qsl, lens, bt, _ = make_batch(CASES, hq, hk, d, block_size, torch.bfloat16, seed=hq + d)
    q = q.to(torch.bfloat16)
    out = paged_attention(q, cache, qsl, lens, bt, d**-0.5, window)
    ref = reference.paged_attention(q.double(), cache.double(), qsl, lens, bt, d**-0.5, window)
    assert calls, "the C kernel did not run"
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 output alone rounds at 2^-9 relative; the probabilities' bf16 rounding adds a little
    assert rel_err(out, ref) < 4e-3
    assert (out.double() - ref).abs().max().item() < 3e-2


def test_attention_writes_every_row_of_a_batch_of_only_long_runs(monkeypatch):
    calls = native_calls(monkeypatch)
    cases = [(1056, 32)] * 5 + [(40, 40)]
    q, cache, qsl, lens, bt, _ = make_batch(cases, 9, 3, 64, 16, torch.bfloat16, seed=5)
    q = q.to(torch.bfloat16)
    ref = reference.paged_attention(q.double(), cache.double(), qsl, lens, bt, 0.125)
    out = paged_attention(q, cache, qsl, lens, bt, 0.125)
    assert len(calls) == 1 and len(calls[0]) == len(cases)  # one call for the whole step
    assert rel_err(out, ref) < 4e-3


def test_without_the_library_the_numba_and_torch_path_gives_the_same_answer(monkeypatch):
    q, cache, qsl, lens, bt, _ = make_batch(CASES, 9, 3, 64, 16, torch.bfloat16, seed=2)
    q = q.to(torch.bfloat16)
    fast = paged_attention(q, cache, qsl, lens, bt, 0.125)
    monkeypatch.setattr(native, "library", lambda: None)
    slow = paged_attention(q, cache, qsl, lens, bt, 0.125)
    ref = reference.paged_attention(q.double(), cache.double(), qsl, lens, bt, 0.125)
    assert rel_err(fast, ref) < 4e-3 and rel_err(slow, ref) < 4e-3
    assert rel_err(fast, slow.double()) < 6e-3


def assert_nearly_bit_exact(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal except for rare differences of a few bf16 ulps (a different summation order moves a
    norm's scale by one ulp, which the weight multiply can widen)."""
    assert got.dtype == ref.dtype == torch.bfloat16 and got.shape == ref.shape
    differ = got != ref
    assert differ.float().mean().item() < 1e-3
    if differ.any():
        ulp = (ref[differ].float().abs() * 2**-5).clamp_min(1e-30)
        assert ((got[differ].float() - ref[differ].float()).abs() <= ulp).all()


@pytest.mark.parametrize("n_tokens", [1, 5, 300, 2049])
def test_elementwise_kernels_round_as_the_reference_rounds(n_tokens):
    torch.manual_seed(n_tokens)
    bf = torch.bfloat16
    x, r, w = (
        torch.randn(n_tokens, 576, dtype=bf),
        torch.randn(n_tokens, 576, dtype=bf),
        torch.randn(576, dtype=bf),
    )
    assert_nearly_bit_exact(elementwise.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    out, summed = elementwise.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_summed = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, ref_summed)
    assert_nearly_bit_exact(out, ref_out)
    qkv = torch.randn(n_tokens, 9 * 64 + 2 * 3 * 64, dtype=bf)
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    ang = torch.rand(n_tokens, 32) * 100
    got_q, got_k = elementwise.rotary_embedding(q, k, ang.cos(), ang.sin(), 64)
    ref_q, ref_k = reference.rotary_embedding(q, k, ang.cos(), ang.sin(), 64)
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    g = torch.randn(n_tokens, 2 * 1536, dtype=bf) * 4
    g[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # exp's overflow and underflow ends
    assert_nearly_bit_exact(elementwise.silu_and_mul(g), reference.silu_and_mul(g))


def test_bf16_cache_write_moves_the_same_bytes_as_the_reference():
    rng = random.Random(0)
    cache = torch.full((2, 40, 16, 3, 64), float("nan"), dtype=torch.bfloat16)
    expected = cache.clone()
    k, v = torch.randn(300, 3, 64, dtype=torch.bfloat16), torch.randn(300, 3, 64, dtype=torch.bfloat16)
    slots = torch.tensor(rng.sample(range(640), 300))
    slots[7] = -1  # padding: skipped
    reshape_and_cache(k, v, cache, slots)
    keep = slots >= 0
    reference.reshape_and_cache(k[keep], v[keep], expected, slots[keep])
    assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))


def test_the_library_is_cached_on_disk_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "kernels_cpu").glob("kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        native.library.cache_clear()


def test_native_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TESSERA_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()


def test_an_unwritable_cache_folder_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(blocked))  # kernels_cpu/ cannot be created inside
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "unavailable" in caplog.text
    finally:
        native.library.cache_clear()
