"""Tensor parallelism through the whole engine: worker processes joined by gloo, each with its
share of the weights and of the KV heads, against the same engine on one rank.

Random-weight Llama (8 heads, 4 KV heads) at 2 ranks, Qwen2 (biases, untied head, a vocabulary
that does not split evenly, 6 heads and one KV head: copied on every rank) at 2 and 3, and the
default model (9 heads, 3 KV heads) at 3: greedy tokens identical, logprobs within fp32
tolerance; seeded sampling and n-gram speculation (and on the default model a JSON schema) give
the one-rank tokens (rank 0's tokens are broadcast). The default model at 2 ranks is refused
before anything starts."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.engine import LLM  # noqa: E402
from tessera.sampling import SamplingParams, StructuredOutput  # noqa: E402

from .test_engine_random_models import save_word_tokenizer  # noqa: E402

VOCAB = 160  # the word tokenizer's
KW = dict(
    dtype="float32", block_size=4, kv_cache_memory=1 << 20, max_model_len=128, max_num_batched_tokens=32
)
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
MODELS = {
    "llama-8h-4kv": (
        "LlamaConfig",
        dict(hidden_size=128, intermediate_size=192, num_attention_heads=8, num_key_value_heads=4),
    ),
    "qwen2-6h-1kv-uneven-vocab": (
        "Qwen2Config",
        dict(hidden_size=96, intermediate_size=144, num_attention_heads=6, num_key_value_heads=1,
             tie_word_embeddings=False, vocab_size=VOCAB + 1),
    ),
}  # fmt: skip


def build(folder, config_cls: str, fields: dict):
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    config = getattr(transformers, config_cls)(**{**base, **fields})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    save_word_tokenizer(folder)
    return str(folder)


def prompts(n=(5, 19, 33)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    # a repeated stretch, so that n-gram lookups find drafts
    return [(torch.randint(2, VOCAB, (k,), generator=g).tolist() * 2)[: 2 * k - 3] for k in n]


def run(llm: LLM, params: list[SamplingParams], ids: list[list[int]]):
    outs = llm.generate(ids, params)
    assert llm.stats().kv_cache_usage == 0.0
    return outs


def same(a, b, tol=1e-4):
    """Identical tokens; each emitted token's logprob within ``tol``."""
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        if x.logprobs:
            worst = max(abs(u[0][1] - v[0][1]) for u, v in zip(x.logprobs, y.logprobs, strict=True))
            assert worst < tol, worst


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("name,size", [("llama-8h-4kv", 2), ("qwen2-6h-1kv-uneven-vocab", 2),
                                       ("qwen2-6h-1kv-uneven-vocab", 3)])  # fmt: skip
def test_random_models_over_ranks_give_one_ranks_tokens_and_logprobs(tmp_path, name, size):
    path = build(tmp_path, *MODELS[name])
    ids = prompts()
    params = [GREEDY] * len(ids)
    expected = run(LLM(path, **KW), params, ids)
    tp = LLM(path, tensor_parallel_size=size, **KW)
    try:
        assert len(tp.engine.executor.pids) == size and tp.engine.runner is None
        same(run(tp, params, ids), expected)
    finally:
        tp.shutdown()


def test_sampling_and_speculation_over_two_ranks_give_one_ranks_tokens(tmp_path):
    path = build(tmp_path, *MODELS["llama-8h-4kv"])
    ids = prompts()
    params = [
        SamplingParams(temperature=0.9, top_k=40, seed=5, max_tokens=20, ignore_eos=True),
        GREEDY,
        SamplingParams(temperature=0.7, top_p=0.8, seed=9, max_tokens=20, ignore_eos=True),
    ]
    expected = run(LLM(path, speculative_config=SPEC, **KW), params, ids)
    tp = LLM(path, tensor_parallel_size=2, speculative_config=SPEC, **KW)
    try:
        same(run(tp, params, ids), expected)
        assert tp.stats().spec_num_drafts > 0
    finally:
        tp.shutdown()


def test_the_default_model_over_three_ranks_and_refused_over_two():
    from tessera.engine.model_source import resolve_model

    try:
        resolve_model("smollm2-135m-instruct")
    except Exception as e:  # pragma: no cover - shipped with the workspace
        pytest.skip(f"the default model is not installed: {e}")
    before = len(multiprocessing.active_children())
    with pytest.raises(ValueError, match=r"9 attention heads .* 2 tensor-parallel ranks.*1 or 3 would work"):
        LLM(tensor_parallel_size=2)
    assert len(multiprocessing.active_children()) == before  # refused before any process started
    kw = dict(dtype="float32", kv_cache_memory=64 << 20, max_model_len=512, speculative_config=SPEC)
    text = ["The capital of France is", "Repeat: red green blue, red green blue, red", "Name a colour."]
    schema = '{"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}'
    params = [
        SamplingParams(temperature=0, max_tokens=16, logprobs=2),
        SamplingParams(temperature=0.8, seed=3, max_tokens=16),
        SamplingParams(temperature=0, max_tokens=24, structured=StructuredOutput(json_schema=schema)),
    ]
    expected = LLM(**kw).generate(text, params)
    tp = LLM(tensor_parallel_size=3, **kw)
    try:
        got = tp.generate(text, params)
        same(got, expected)
        assert got[2].text.startswith("{") and tp.stats().spec_num_drafts > 0
    finally:
        tp.shutdown()


def test_torchrun_launch_of_two_ranks_prints_one_ranks_answer(tmp_path):
    """The documented multi-node launch (`torchrun --nnodes/--node-rank/--master-addr`), here with
    one node of two processes: rank 0 runs the engine and prints; rank 1 runs its steps."""
    import json
    import os
    import subprocess
    import sys

    from integration_tests.conftest import _free_port

    path = build(tmp_path / "m", *MODELS["llama-8h-4kv"])
    args = ["generate", "t5 t9 t33 t5 t9 t33", "--model", path, "--dtype", "float32", "--kv-cache-memory",
            "1MiB", "--max-model-len", "128", "--max-tokens", "16", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one = subprocess.run([sys.executable, "-m", "tessera.engine.cli", *args], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert one.returncode == 0, one.stderr
    port = str(_free_port())
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
              "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]  # fmt: skip
    two = subprocess.run([*launch, "-m", "tessera.engine.cli", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [json.loads(x) for x in two.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 alone answers
    assert lines[0]["token_ids"] == json.loads(one.stdout)["token_ids"]
