"""Batch invariance of the C kernels: a row's result is the same to the bit whatever runs beside
it (1, 3, 17 or 31 other rows or sequences), however its sequence's run was chunked (a whole
prompt, a chunk that starts mid-sequence as after a prefix-cache hit, a decode), and whichever
layout the kernel picked for it. Exact equality, not closeness: this is what lets a seeded
request give the same tokens alone, in a batch, or after its prefix was cached."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.kernels import LinearWeights, reference, registry
from tessera.kernels_cpu import decoder, native, packed, paged_attention

from .test_decoder import packed_weight, random_model

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C kernels on this machine")

OTHERS = [0, 1, 3, 17, 31]
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class PagedSequences:
    """Sequences' K/V in one bf16 cache (blocks scattered at random) and every query token of
    each, so any run of any sequence can be attended to as one step would."""

    def __init__(
        self,
        lengths: list[int],
        hq: int,
        hk: int,
        d: int,
        block_size: int,
        seed: int,
        kv_dtype=torch.bfloat16,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        n_blocks = sum(-(-n // block_size) for n in lengths) + 3
        free = list(range(n_blocks))
        rng.shuffle(free)
        q_dtype = torch.float32 if kv_dtype == torch.float32 else torch.bfloat16
        quantized = reference.is_quantized_kv(kv_dtype)
        self.cache = torch.zeros(2, n_blocks, block_size, hk, d, dtype=kv_dtype)
        if not quantized:
            self.cache.fill_(float("nan"))  # a slot read before it is written shows
        self.scales = torch.ones(2, n_blocks, block_size, hk) if quantized else None
        self.tables, self.queries = [], []
        for n in lengths:
            table = [free.pop() for _ in range(-(-n // block_size))]
            slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
            kv = torch.randn(2, n, hk, d, generator=g).to(q_dtype)
            reference.reshape_and_cache(kv[0], kv[1], self.cache, slots, self.scales)
            self.tables.append(table)
            self.queries.append(torch.randn(n, hq, d, generator=g).to(q_dtype))

    def attend(self, runs: list[tuple[int, int, int]], window: int | None) -> list[torch.Tensor]:
        """One call for runs (sequence, first position, end): each run's output [end - first, Hq, D]."""
        width = max(len(self.tables[s]) for s, _, _ in runs)
        bt = torch.tensor(
            [self.tables[s] + [0] * (width - len(self.tables[s])) for s, _, _ in runs], dtype=torch.int32
        )
        q = torch.cat([self.queries[s][a:b] for s, a, b in runs])
        qsl = torch.tensor(np.cumsum([0] + [b - a for _, a, b in runs]), dtype=torch.int32)
        lens = torch.tensor([b for _, _, b in runs], dtype=torch.int32)
        d = q.shape[-1]
        out = paged_attention(q, self.cache, qsl, lens, bt, d**-0.5, window, self.scales)
        return [out[qsl[i] : qsl[i + 1]] for i in range(len(runs))]


def other_runs(rng: random.Random, n: int, lengths: list[int]) -> list[tuple[int, int, int]]:
    """n runs of the other sequences (1..): decodes, short runs, chunks mid-sequence, prompts."""
    runs = []
    for _ in range(n):
        s = rng.randrange(1, len(lengths))
        end = rng.randint(1, lengths[s])
        new = rng.choice([1, 1, 2, 4, 5, 16, 64, end])
        runs.append((s, max(0, end - new), end))
    return runs


@SETTINGS
@given(
    shape=st.sampled_from([(9, 3, 64, 16), (8, 1, 128, 1), (16, 2, 64, 5), (4, 4, 32, 16), (32, 1, 64, 16)]),
    window=st.sampled_from([None, None, 7, 70]),
    length=st.integers(1, 300),
    data=st.data(),
)
def test_attention_row_is_the_same_alone_in_any_batch_and_any_chunk(shape, window, length, data):
    hq, hk, d, block_size = shape
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = random.Random(seed)
    lengths = [length] + [rng.randint(1, 300) for _ in range(6)]
    seqs = PagedSequences(lengths, hq, hk, d, block_size, seed)
    pos = data.draw(st.integers(0, length - 1), label="pos")
    # the token alone, as a decode at the end of its sequence so far
    (alone,) = seqs.attend([(0, pos, pos + 1)], window)
    chunks = [(0, pos + 1), (max(0, pos - 3), pos + 1), (max(0, pos - 4), pos + 1)]
    for _ in range(3):  # chunks that hold the token anywhere, start mid-sequence, straddle tiles
        a = data.draw(st.integers(0, pos), label="chunk start")
        chunks.append((a, data.draw(st.integers(pos + 1, length), label="chunk end")))
    for n_others in OTHERS:
        for a, b in chunks:
            runs = other_runs(rng, n_others, lengths)
            runs.insert(rng.randint(0, len(runs)), (0, a, b))
            out = seqs.attend(runs, window)[runs.index((0, a, b))]
            assert torch.equal(out[pos - a], alone[0]), (
                f"token {pos} in chunk [{a}, {b}) beside {n_others} other runs"
            )


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn])
def test_attention_prefill_and_decode_agree_on_every_token(kv_dtype):
    """Each token of a 150-token prompt (several query tiles, key tiles of 64) as computed in one
    prefill equals, to the bit, the token computed as a decode: the C kernel's two layouts for
    bf16, the Numba kernel for the others (SDPA, whose blocking follows the run's length, is
    left out in batch-invariant mode)."""
    for window in (None, 5, 100):
        seqs = PagedSequences([150], 9, 3, 64, 16, seed=3, kv_dtype=kv_dtype)
        (whole,) = seqs.attend([(0, 0, 150)], window)
        singles = torch.cat([seqs.attend([(0, p, p + 1)], window)[0] for p in range(150)])
        assert torch.equal(whole, singles), f"window {window}"


SCHEMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return {s: packed_weight(s, 96, 512, rng) for s in SCHEMES}


@SETTINGS
@given(
    scheme=st.sampled_from(SCHEMES),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    n_others=st.sampled_from([*OTHERS, 70]),
    data=st.data(),
)
def test_packed_product_row_is_the_same_alone_and_among_other_rows(weights, scheme, dtype, n_others, data):
    """Tiles of 8 tokens (4 for fp32 inputs) and blocks of 64: the row lands at any place in them."""
    w = weights[scheme]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    row = torch.randn(1, 512, generator=g).to(dtype)
    alone = packed.linear(row, w, out_dtype=torch.float32)
    at = data.draw(st.integers(0, n_others), label="place")
    x = torch.randn(n_others + 1, 512, generator=g).to(dtype)
    x[at] = row[0]
    for out_dtype in (torch.float32, torch.bfloat16):
        got = packed.linear(x, w, out_dtype=out_dtype)[at]
        want = alone[0] if out_dtype == torch.float32 else packed.linear(row, w, out_dtype=out_dtype)[0]
        assert torch.equal(got, want), f"{scheme} {dtype} -> {out_dtype}, row {at} of {n_others + 1}"


# chunkings of a 41-token target sequence: a whole prompt, a prefix-cache hit (the last 1, 2, 3, 4
# or 9 tokens computed after the rest), small chunks (a small --max-num-batched-tokens), decodes
TARGET = list(range(7, 48))
CHUNKINGS = [[41], [40, 1], [39, 2], [38, 3], [37, 4], [32, 9], [16, 16, 9], [5] * 8 + [1], [20] + [1] * 21]


def split(tokens: list[int], sizes: list[int]) -> list[list[int]]:
    out, at = [], 0
    for n in sizes:
        out.append(tokens[at : at + n])
        at += n
    assert at == len(tokens)
    return out


def llama(dtype: torch.dtype):
    model = random_model(["Q4_0", "Q8_0", "Q4_1", "Q6_K"], qkv_bias=True, window_layer=1)
    # the LM head packed too (as the default model's tied Q8_0 embedding), 304 rows for 16s
    model.lm_head.weight = packed_weight("Q8_0", 304, 256, np.random.default_rng(1))
    if dtype == torch.float32:
        model.dtype = dtype
        model.embed_tokens.weight = model.embed_tokens.weight.float()
        model.norm.weight = model.norm.weight.float()
        model.layer_specs = [
            dataclasses.replace(
                s,
                input_norm=s.input_norm.float(),
                post_attention_norm=s.post_attention_norm.float(),
                qkv=LinearWeights(s.qkv.weight, s.qkv.bias.float()),
            )
            for s in model.layer_specs
        ]
    return model


@pytest.mark.parametrize("path", ["fused stack", "op by op", "op by op, float32"])
def test_decoder_logits_of_a_sequence_do_not_depend_on_chunking_or_neighbours(monkeypatch, path):
    """Every logit of the target sequence through the whole model (the fused decoder stack, or
    op by op) is the same to the bit for every chunking of it and every set of neighbours."""
    from tessera.models.harness import forward_chunks

    model = llama(torch.float32 if "float32" in path else torch.bfloat16)
    rng = random.Random(0)
    if path == "fused stack":

        def no_fallback(*args):
            raise AssertionError("the fused stack fell back to the op-by-op path")

        monkeypatch.setattr(decoder.reference, "decoder_layers", no_fallback)
    else:
        registry.unregister("decoder_layers", "cpu")
    try:
        want = None
        for sizes in CHUNKINGS:
            for n_others in (0, 1, 3, 17):
                target = split(TARGET, sizes)
                others = []
                for _ in range(n_others):  # neighbours: prompts, chunks and decodes of their own
                    sizes_ = [rng.choice([1, 1, 3, 8, 30]) for _ in range(rng.randint(1, len(target) + 2))]
                    others.append([[rng.randrange(300) for _ in range(n)] for n in sizes_])
                at = rng.randint(0, n_others)
                seqs = [*others[:at], target, *others[at:]]
                got = forward_chunks(model, seqs, block_size=4, seed=len(sizes) + n_others)[at]
                if want is None:
                    want = got
                assert torch.equal(got, want), f"chunks {sizes} beside {n_others} other sequences"
    finally:
        if path.startswith("op by op"):
            registry.register("decoder_layers", "cpu")(decoder.decoder_layers)
