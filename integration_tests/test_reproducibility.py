"""Reproducibility of the default engine (DESIGN.md, Determinism): a request's tokens depend only on
its prompt, parameters and seed, never on what runs beside it, the prefix-cache state, the
chunking of its prompt, or a preemption. Exactly equal token ids, in the default dtype (bf16 on
CPUs with the C kernels), sampled with a seed and greedy."""

import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tessera.engine import LLM
from tessera.kernels_cpu import native
from tessera.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    native.library() is None,
    reason="batch invariance is a property of the C kernels; the torch fallback's GEMM and SDPA "
    "pick algorithms by shape",
)

MAX_TOKENS = 32
VOCAB_LO, VOCAB_HI = 100, 49000  # below 100: special tokens
KV = 64 * 2**20


def load(path, **kw) -> LLM:
    return LLM(str(path), **({"kv_cache_memory": KV, "max_model_len": 512} | kw))


@pytest.fixture(scope="module")
def llm(default_model_path):
    """The default configuration: whole prompts in one step (2,048 tokens a step), prefix caching."""
    return load(default_model_path)


@pytest.fixture(scope="module")
def small_steps(default_model_path):
    """Prompts prefilled 16 and 37 tokens a step (--max-num-batched-tokens 16 / 37)."""
    return [load(default_model_path, max_num_batched_tokens=n) for n in (16, 37)]


def params(temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True)


def neighbours(rng: random.Random, n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """n other requests: short and long prompts, greedy, seeded and unseeded sampling, some that
    share the start of another one, other lengths of output."""
    prompts, ps = [], []
    for _ in range(n):
        length = rng.choice([1, 3, 16, 17, 40, 90, 150])
        prompt = [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(length)]
        if prompts and rng.random() < 0.2:
            prompt = prompts[-1][:16] + prompt
        prompts.append(prompt)
        kind = rng.randrange(3)
        ps.append(
            SamplingParams(
                temperature=0.0 if kind == 0 else rng.choice([0.7, 1.0, 1.3]),
                seed=rng.randrange(2**32) if kind == 1 else None,
                top_p=rng.choice([1.0, 0.9]),
                max_tokens=rng.randint(1, MAX_TOKENS + 8),
                ignore_eos=True,
            )
        )
    return prompts, ps


def alone(llm: LLM, prompt, p: SamplingParams) -> list[int]:
    llm.reset_prefix_cache()
    (out,) = llm.generate([prompt], p)
    assert out.num_cached_tokens == 0
    return out.token_ids


def token_prompts():
    return st.lists(st.integers(VOCAB_LO, VOCAB_HI - 1), min_size=1, max_size=120)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    prompt=token_prompts(),
    temperature=st.sampled_from([0.0, 0.9]),
    seed=st.integers(0, 2**63),
    mix=st.integers(),
)
# prompt lengths 16 k + 1..4: after a prefix hit only 1-4 tokens are left to compute (issue 10)
@example(prompt=list(range(1000, 1034)), temperature=0.9, seed=7, mix=0)
@example(prompt=list(range(2000, 2050)), temperature=0.0, seed=7, mix=1)
def test_a_request_gives_the_same_tokens_alone_in_a_batch_after_a_prefix_hit_and_in_small_chunks(
    llm, small_steps, prompt, temperature, seed, mix
):
    p = params(temperature, seed)
    want = alone(llm, prompt, p)
    assert len(want) == MAX_TOKENS

    # (c) its whole blocks are in the prefix cache now: only the rest is computed, from mid-sequence
    (again,) = llm.generate([prompt], p)
    assert again.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert again.token_ids == want, "after a prefix-cache hit"

    # (b) beside 31 other requests, in a random place
    rng = random.Random(mix)
    others, other_ps = neighbours(rng, 31)
    at = rng.randint(0, 31)
    outs = llm.generate([*others[:at], prompt, *others[at:]], [*other_ps[:at], p, *other_ps[at:]])
    assert outs[at].token_ids == want, "among 31 other requests"

    # (d) its prompt prefilled in chunks of 16 and of 37 tokens, alone and in a batch
    for small in small_steps:
        budget = small.args.max_num_batched_tokens
        assert alone(small, prompt, p) == want, f"prefilled {budget} tokens a step"
        outs = small.generate([*others[:3], prompt], [*other_ps[:3], p])
        assert outs[3].token_ids == want, f"prefilled {budget} tokens a step, beside 3 others"


def test_a_preempted_seeded_request_draws_as_if_it_never_was(llm, default_model_path):
    """A KV pool too small for the batch: requests are preempted and recomputed, and their
    sampling resumes at the draw for their next output position, not at the first."""
    rng = random.Random(5)
    prompts = [[rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(rng.randint(20, 60))] for _ in range(12)]
    ps = [params(0.9, seed=100 + i) for i in range(12)]
    want = [alone(llm, q, p) for q, p in zip(prompts, ps, strict=True)]
    c = llm.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * llm.model.dtype.itemsize
    tight = load(default_model_path, kv_cache_memory=20 * 16 * per_token, max_model_len=128)  # 20 blocks
    outs = tight.generate(prompts, ps)
    assert tight.stats().num_preemptions > 0
    for i, out in enumerate(outs):
        assert out.token_ids == want[i], f"request {i}"
