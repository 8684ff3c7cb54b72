"""The Triton paged attention and cache write against the torch references of
``tessera.kernels.reference`` (``paged_attention``, ``reshape_and_cache``), and their batch
invariance to the bit.

Tolerances: fp32 1e-5 (fp32 everywhere; only the summation order differs from the reference);
fp16 2e-3 (K/V and the softmax weights enter the matmul as fp16, the output is rounded to fp16).
An int8/fp8 cache is compared with the reference reading the same quantized cache, so its
dequantization is exact on both sides and the tolerance is the query dtype's.
"""

import pytest
import torch

from tessera.kernels import reference
from tessera.kernels_cuda import attention

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def paged_attention(*args, **kw):
    """The kernel on the test's device (the GPU where there is one, else the interpreter) on
    inputs built on the CPU; the output back on the CPU, beside the reference's."""
    return attention.paged_attention(*map(_on, args), **{k: _on(v) for k, v in kw.items()}).cpu()


def reshape_and_cache(key, value, cache, slots, scales=None):
    """The cache write on the test's device; the CPU cache (and scales) updated in place from it."""
    c, s = _on(cache), _on(scales)
    attention.reshape_and_cache(_on(key), _on(value), c, _on(slots), s)
    cache.copy_(c.cpu())
    if scales is not None:
        scales.copy_(s.cpu())


@pytest.fixture
def small_partitions(monkeypatch):
    """Partitions of 64 keys, so short sequences already span several (the interpreter is slow)."""
    monkeypatch.setattr(attention, "PARTITION", 64)


def force_split(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(attention, "SPLIT_PROGRAMS_BELOW", 10**9 if on else 0)


class Batch:
    """A ragged step: sequence i has ``ctx[i]`` cached tokens before its ``new[i]`` queries. Every
    K/V row of every sequence is in a cache whose other blocks are NaN (or NaN scales for int8/fp8);
    block-table entries a query may not read (past the sequence, or wholly before every query's
    sliding window) point at NaN blocks, and so do the slots of a last block past the sequence's end."""

    def __init__(self, ctx, new, hq, hk, d, block_size, cache_dtype, q_dtype, window=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.seq_lens = [c + n for c, n in zip(ctx, new, strict=True)]
        width = max(-(-s // block_size) for s in self.seq_lens) + 1
        num_blocks = sum(-(-s // block_size) for s in self.seq_lens) + 5
        quantized = reference.is_quantized_kv(cache_dtype)
        if quantized:
            self.cache = torch.zeros(2, num_blocks, block_size, hk, d).to(cache_dtype)
            self.scales = torch.full((2, num_blocks, block_size, hk), float("nan"))
        else:
            self.cache = torch.full((2, num_blocks, block_size, hk, d), float("nan"), dtype=cache_dtype)
            self.scales = None
        order = torch.randperm(num_blocks, generator=g).tolist()
        nan_blocks = order[-5:]
        cycle = torch.arange(width * len(ctx)) % len(nan_blocks)
        self.table = torch.tensor(nan_blocks, dtype=torch.int32)[cycle].view(-1, width)
        for i, s in enumerate(self.seq_lens):
            first_q = s - new[i]
            lo = 0 if window is None else max(0, first_q - window + 1)
            for j in range(-(-s // block_size)):
                blk = order.pop()
                slots = torch.arange(blk * block_size, (blk + 1) * block_size)
                kv = torch.randn(2, block_size, hk, d, generator=g)
                reference.reshape_and_cache(kv[0], kv[1], self.cache, slots, self.scales)
                tail = slots[slots >= blk * block_size + s - j * block_size]  # past the end: never read
                if quantized:
                    self.scales.view(2, -1, hk)[:, tail] = float("nan")
                else:
                    self.cache.view(2, -1, hk, d)[:, tail] = float("nan")
                if (j + 1) * block_size > lo:  # blocks out of every window: given back, left NaN
                    self.table[i, j] = blk
        self.query = torch.randn(sum(new), hq, d, generator=g).to(q_dtype)
        self.qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
        self.lens = torch.tensor(self.seq_lens, dtype=torch.int32)
        self.window = window
        self.scale = d**-0.5

    def run(self, op, **kw):
        return op(
            self.query,
            self.cache,
            self.qsl,
            self.lens,
            self.table,
            self.scale,
            sliding_window=self.window,
            kv_scales=self.scales,
            **kw,
        )


# (cached, new) per sequence: prefill from scratch, a chunk over cached blocks, decodes, empty ones
MIXED = ([0, 37, 90, 0, 5, 20, 12], [21, 11, 1, 0, 1, 0, 3])

CASES = [
    # hq, hk, d, block size, cache dtype, query dtype, window
    (9, 3, 80, 16, torch.float32, torch.float32, None),
    (4, 1, 64, 32, torch.float16, torch.float16, None),
    (2, 2, 128, 16, torch.float32, torch.float32, 13),
    (9, 3, 96, 32, torch.float16, torch.float16, 20),
    (4, 1, 80, 16, torch.int8, torch.float32, None),
    (9, 3, 64, 32, torch.float8_e4m3fn, torch.float32, 17),
    (4, 2, 64, 16, torch.int8, torch.float16, 30),
    (6, 2, 96, 16, torch.float8_e4m3fn, torch.float16, None),
]


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split-k"])
@pytest.mark.parametrize("hq,hk,d,bs,cache_dtype,q_dtype,window", CASES)
def test_paged_attention_matches_the_torch_reference_on_a_mixed_batch(
    hq, hk, d, bs, cache_dtype, q_dtype, window, split, small_partitions, monkeypatch
):
    force_split(monkeypatch, split)
    batch = Batch(*MIXED, hq, hk, d, bs, cache_dtype, q_dtype, window)
    out = batch.run(paged_attention)
    ref = batch.run(reference.paged_attention)
    assert out.dtype == q_dtype and out.isfinite().all()  # no NaN block was read
    torch.testing.assert_close(out, ref, atol=TOL[q_dtype], rtol=TOL[q_dtype])


def test_the_builders_host_bounds_change_no_bit(small_partitions, monkeypatch):
    """max_seq_len / max_query_len from the metadata builder only narrow the launch."""
    force_split(monkeypatch, True)
    batch = Batch(*MIXED, 9, 3, 80, 16, torch.float32, torch.float32, None)
    plain = batch.run(paged_attention)
    bounded = batch.run(paged_attention, max_query_len=max(MIXED[1]), max_seq_len=int(batch.lens.max()))
    assert torch.equal(plain, bounded)


def test_a_long_decode_takes_the_split_path_and_matches_the_reference(small_partitions, monkeypatch):
    monkeypatch.setattr(attention, "SPLIT_PROGRAMS_BELOW", 64)
    batch = Batch([300, 129], [1, 1], 8, 2, 64, 16, torch.float32, torch.float32)
    partition, n_parts, split = attention.split_plan(
        2 * 2 * 2, 2, 2, batch.table.shape[1] * 16, 16, 64, torch.device("cpu"), True
    )
    assert (partition, split) == (64, True) and n_parts >= 5
    out = batch.run(paged_attention)
    torch.testing.assert_close(out, batch.run(reference.paged_attention), atol=1e-5, rtol=1e-5)


def test_batch_invariant_false_picks_partitions_by_load_and_matches_the_reference():
    batch = Batch([200, 0], [1, 7], 4, 1, 64, 16, torch.float16, torch.float16, None)
    out = batch.run(paged_attention, batch_invariant=False)
    torch.testing.assert_close(out, batch.run(reference.paged_attention), atol=2e-3, rtol=2e-3)


def test_batch_invariant_false_prefill_tiles_of_64_rows_match_the_reference(monkeypatch):
    monkeypatch.setattr(attention, "PREFILL_TOKENS", 16)
    batch = Batch([0, 30, 70], [45, 20, 1], 6, 2, 64, 16, torch.int8, torch.float16, window=40)
    out = batch.run(paged_attention, batch_invariant=False)
    assert out.isfinite().all()
    torch.testing.assert_close(out, batch.run(reference.paged_attention), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_rows_output_is_bit_identical_alone_in_a_batch_chunked_or_as_a_decode(
    dtype, small_partitions, monkeypatch
):
    n, hq, hk, d, bs = 100, 6, 2, 80, 16
    whole = Batch([0, 40, 0], [n, 1, 9], hq, hk, d, bs, dtype, dtype, seed=3)
    cache, table0 = whole.cache, whole.table[0:1]
    q = whole.query[:n]

    def run(qs, qsl, lens, tables, split):
        force_split(monkeypatch, split)
        return paged_attention(
            qs, cache, torch.as_tensor(qsl, dtype=torch.int32), torch.as_tensor(lens, dtype=torch.int32),
            tables, d**-0.5,
        )  # fmt: skip

    alone = run(q, [0, n], [n], table0, False)
    expect = reference.paged_attention(q, cache, torch.tensor([0, n]), torch.tensor([n]), table0, d**-0.5)
    torch.testing.assert_close(alone, expect, atol=TOL[dtype], rtol=TOL[dtype])
    in_batch = run(whole.query, whole.qsl, whole.lens, whole.table, False)
    assert torch.equal(alone, in_batch[:n])
    chunks = run(q, [0, 41, n], [41, n], torch.cat([table0, table0]), False)  # one step, two chunks
    assert torch.equal(alone, chunks)
    first = run(q[:70], [0, 70], [70], table0, False)  # two steps, a chunk over cached blocks
    second = run(q[70:], [0, n - 70], [n], table0, False)
    assert torch.equal(alone, torch.cat([first, second]))
    for split in (False, True):  # each query row as a decode step, alone or beside others
        for p in (0, 63, 64, n - 1):
            decode = run(q[p : p + 1], [0, 1], [p + 1], table0, split)
            assert torch.equal(alone[p : p + 1], decode), (p, split)
        beside = run(torch.cat([q[n - 1 :], whole.query[n:]]), [0, 1, 2, 11], [n, 41, 9], whole.table, split)
        assert torch.equal(alone[n - 1 :], beside[:1])


def test_a_windowed_rows_output_is_bit_identical_alone_or_chunked(small_partitions, monkeypatch):
    n, w = 140, 45
    whole = Batch([0], [n], 4, 2, 64, 16, torch.float32, torch.float32, seed=5)
    whole.window = w
    alone = whole.run(paged_attention)
    torch.testing.assert_close(alone, whole.run(reference.paged_attention), atol=1e-5, rtol=1e-5)
    q, t = whole.query, whole.table
    for split in (False, True):
        force_split(monkeypatch, split)
        lens = torch.tensor([77, n], dtype=torch.int32)
        chunks = paged_attention(
            q, whole.cache, torch.tensor([0, 77, n], dtype=torch.int32), lens, torch.cat([t, t]), 0.125, w
        )
        assert torch.equal(alone, chunks)
        decode = paged_attention(
            q[n - 1 :], whole.cache, torch.tensor([0, 1], dtype=torch.int32), lens[1:], t, 0.125, w
        )
        assert torch.equal(alone[n - 1 :], decode)


@pytest.mark.parametrize(
    "cache_dtype,key_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.int8, torch.float32),
        (torch.int8, torch.float16),
        (torch.float8_e4m3fn, torch.float32),
        (torch.float8_e4m3fn, torch.bfloat16),
    ],
)
def test_reshape_and_cache_matches_the_torch_reference_and_skips_negative_slots(cache_dtype, key_dtype):
    t, hk, d, nb, bs = 13, 3, 80, 5, 16
    g = torch.Generator().manual_seed(1)
    key = (torch.randn(t, hk, d, generator=g) * 4).to(key_dtype)
    value = torch.randn(t, hk, d, generator=g).to(key_dtype)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[[2, 7]] = -1  # padding tokens: not written
    cache = torch.randn(2, nb, bs, hk, d, generator=g).to(cache_dtype)
    scales = torch.rand(2, nb, bs, hk, generator=g) if reference.is_quantized_kv(cache_dtype) else None
    expect = cache.clone()
    expect_scales = None if scales is None else scales.clone()
    keep = slots >= 0
    # the reference indexes with the slots, so it is given only the tokens that are written
    reference.reshape_and_cache(key[keep], value[keep], expect, slots[keep], expect_scales)
    reshape_and_cache(key, value, cache, slots, scales)
    assert torch.equal(cache.view(torch.uint8), expect.view(torch.uint8))
    if scales is not None:
        assert torch.equal(scales, expect_scales)


def test_fp8_cache_write_rounds_ties_to_even_like_torch():
    # amax 448 gives scale 1, so these land exactly on fp8 ties, subnormal ones included
    row = [448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, -1.0625, 0.0, -0.0, 300.0, 17.0, 19.0]
    x = torch.tensor(row + [0.0] * (32 - len(row))).view(1, 1, 32)
    cache = torch.zeros(2, 1, 1, 1, 32).to(torch.float8_e4m3fn)
    scales = torch.zeros(2, 1, 1, 1)
    reshape_and_cache(x, -x, cache, torch.tensor([0]), scales)
    q, s = reference.quantize_kv(x, torch.float8_e4m3fn)
    assert torch.equal(cache[0, 0, 0].view(torch.uint8), q[0].view(torch.uint8))
    assert torch.equal(
        cache[1, 0, 0].view(torch.uint8), (-q[0].float()).to(torch.float8_e4m3fn).view(torch.uint8)
    )
    assert s.item() == scales[0].item() == 1.0


def test_refuses_a_quantized_cache_without_scales():
    cache = torch.zeros(2, 2, 16, 1, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="kv_scales"):
        attention.reshape_and_cache(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), cache, torch.tensor([0]))
