"""The engine gives each request the tokens it gives it alone (itself checked against
transformers in test_default_model_vs_transformers), whatever else runs: prefix caching on or
off, chunked prefill on or off, among 16 requests of mixed lengths, and under a KV pool so
small that requests are preempted and recomputed."""

import pytest
import torch

from tessera.engine import LLM
from tessera.sampling import SamplingParams

NEAR_TIE = 0.01
MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

_SENTENCES = [
    "The history of the city goes back to Roman times, when a small fort guarded the river crossing.",
    "def quicksort(xs):\n    if len(xs) < 2:\n        return xs\n",
    "Ingredients: two cups of flour, one egg, a pinch of salt and a glass of milk.",
    "In 1905 Einstein published four papers that changed physics.",
]
SHARED = " ".join(_SENTENCES * 3)  # ~200 tokens shared by several prompts


def make_prompts() -> list[str]:
    prompts = []
    for i in range(16):
        if i % 4 == 0:
            prompts.append(SHARED + f" Question {i}: what happened next?")
        elif i % 4 == 1:
            prompts.append(_SENTENCES[i % 4])
        elif i % 4 == 2:
            prompts.append(" ".join(_SENTENCES[: 1 + i % 3]) * (1 + i // 4))
        else:
            prompts.append(f"List {i} colors:")
    return prompts


PROMPTS = make_prompts()


@pytest.fixture(scope="module")
def reference(default_llm, hf_default_model):
    """Each prompt run alone, and transformers' top-1/top-2 margins along that path."""
    out = {}
    for p in PROMPTS:
        (alone,) = default_llm.generate([p], GREEDY)
        ids = default_llm.tokenizer.encode(p) + alone.token_ids
        with torch.no_grad():
            logits = hf_default_model(torch.tensor([ids])).logits[0, -MAX_TOKENS - 1 : -1].float()
        top2 = logits.topk(2).values
        out[p] = (alone.token_ids, (top2[:, 0] - top2[:, 1]).tolist())
    return out


def assert_same_as_alone(outputs, reference):
    compared = 0
    for p, out in zip(PROMPTS, outputs, strict=True):
        alone, margins = reference[p]
        assert len(out.token_ids) == MAX_TOKENS
        for step, (a, b) in enumerate(zip(out.token_ids, alone, strict=True)):
            if margins[step] < NEAR_TIE:
                break
            assert a == b, f"{p[:40]!r}: step {step}: {a} vs alone {b} (margin {margins[step]:.4f})"
            compared += 1
    assert compared >= 0.8 * len(PROMPTS) * MAX_TOKENS


def run(llm: LLM):
    return llm.generate(PROMPTS, GREEDY)


def test_sixteen_mixed_requests_with_prefix_caching_match_each_alone(default_llm, reference):
    before = default_llm.stats().prefix_cache_hits
    outs = run(default_llm)
    assert_same_as_alone(outs, reference)
    assert default_llm.stats().prefix_cache_hits > before
    shared = [o for p, o in zip(PROMPTS, outs, strict=True) if p.startswith(SHARED)]
    assert all(o.num_cached_tokens >= 160 for o in shared)


def test_without_prefix_caching_the_tokens_are_the_same(reference, default_model_path):
    llm = LLM(
        str(default_model_path),
        dtype="float32",
        kv_cache_memory=256 * 2**20,
        max_model_len=2048,
        enable_prefix_caching=False,
    )
    outs = run(llm)
    assert_same_as_alone(outs, reference)
    assert llm.stats().prefix_cache_hits == 0 and all(o.num_cached_tokens == 0 for o in outs)


@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_prefill_on_or_off_gives_the_same_tokens(reference, chunked, default_model_path):
    # a budget of 64 tokens splits every long prompt across steps when chunking is on
    budget = 64 if chunked else 1024
    llm = LLM(
        str(default_model_path),
        dtype="float32",
        kv_cache_memory=256 * 2**20,
        max_model_len=1024,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
    )
    assert_same_as_alone(run(llm), reference)


def test_a_kv_pool_too_small_for_the_batch_preempts_and_still_matches(reference, default_model_path):
    # room for 1024 tokens: the 16 requests need about 2,000, so some must wait or be preempted
    llm = LLM(
        str(default_model_path),
        dtype="float32",
        kv_cache_memory=1024 * 46080,
        max_model_len=1024,
        block_size=16,
    )
    outs = run(llm)
    assert llm.stats().num_preemptions > 0
    assert_same_as_alone(outs, reference)
    assert llm.stats().kv_cache_usage == 0.0  # every block came back


def test_a_request_that_fails_mid_batch_leaves_nothing_allocated(default_llm):
    class Boom(Exception):
        pass

    runner = default_llm.engine.runner
    real = runner.execute_model
    calls = {"n": 0}

    def flaky(so):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom
        return real(so)

    runner.execute_model = flaky
    try:
        with pytest.raises(Boom):
            default_llm.generate(PROMPTS[:4], GREEDY)
    finally:
        runner.execute_model = real
    assert not default_llm.has_unfinished_requests()
    assert default_llm.stats().kv_cache_usage == 0.0
    # blocks of the failed step were never written, so nothing may be found in the cache
    assert not default_llm.engine.scheduler.kv.pool.cached
    # and the engine still serves
    assert default_llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=2))[0].token_ids
