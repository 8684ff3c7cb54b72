"""Tensor parallelism on the CPU with gloo: 2, 3 and 4 processes, each loading its rank's part of
the same checkpoint, give one process's logits (TP=1) within fp32 tolerance and the same greedy
tokens. Random Llama (8 heads, 4 KV heads: split over 2 and 4, tied vocabulary-parallel head),
random Qwen2 (q/k/v biases, an untied head, a vocabulary of 1001 that splits unevenly, one KV
head that every rank holds a copy of: over 2 and 3), random Gemma 3, Mixtral and Qwen2-MoE over
2, and the default model (SmolLM2-135M, packed Q4_1: 9 heads over 3 ranks; over 2 refused
before anything loads, naming the sizes that work)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.formats import FormatError, ModelConfig, open_checkpoint  # noqa: E402
from tessera.models import (  # noqa: E402
    TPInfo,
    check_tensor_parallel,
    kv_cache_spec,
    load_model,
    tensor_parallel_sizes,
)

WORKER = Path(__file__).with_name("tp_worker.py")
_spec = importlib.util.spec_from_file_location("tp_worker", WORKER)
tp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp_worker)

WORLD = 4  # one group of processes serves every case; a case of n ranks runs on ranks 0..n-1
STEPS = 4  # greedy decode steps after the prefill
# fp32 on both sides; the row-parallel sums and the split attention add in another order, so
# logits may differ by rounding, relative to the largest logit
RTOL = 1e-4

LLAMA = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)
QWEN2 = dict(
    vocab_size=1001,
    hidden_size=96,
    intermediate_size=144,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)
# the other families over 2 ranks: Gemma 3 (sliding and global layers, QK-norm, soft-capped
# logits), Mixtral (experts split by their intermediate size, run as DecoderLayerSpecs), Qwen2-MoE
# (a gated shared expert, a dense layer)
OTHERS = {
    "gemma3": (
        "Gemma3TextConfig",
        dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
             final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(vocab_size=300, hidden_size=128, num_local_experts=4, num_experts_per_tok=2,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(vocab_size=300, hidden_size=128, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=64, shared_expert_intermediate_size=96, intermediate_size=96,
             norm_topk_prob=False, mlp_only_layers=[1], num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64),
    ),
}  # fmt: skip


def build_hf(folder: Path, config) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    return folder


def prompts(vocab: int, lengths=(3, 9, 14), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, default_model_path) -> dict[str, dict]:
    """Each case: checkpoint, ranks, prompts; by name."""
    root = tmp_path_factory.mktemp("tp")
    llama = build_hf(root / "llama", transformers.LlamaConfig(**LLAMA))
    qwen2 = build_hf(root / "qwen2", transformers.Qwen2Config(**QWEN2))
    smol = dict(path=str(default_model_path), packed=True, prompts=prompts(49152, (5, 12, 20)))
    cases = {
        "llama-2": dict(path=str(llama), ranks=2, prompts=prompts(256)),
        "llama-4": dict(path=str(llama), ranks=4, prompts=prompts(256)),
        "qwen2-2": dict(path=str(qwen2), ranks=2, prompts=prompts(1001)),
        "qwen2-3": dict(path=str(qwen2), ranks=3, prompts=prompts(1001)),
        "smollm2-3": dict(smol, ranks=3),
    }
    for name, (cls, fields) in OTHERS.items():
        path = build_hf(root / name, getattr(transformers, cls)(**fields))
        cases[f"{name}-2"] = dict(path=str(path), ranks=2, prompts=prompts(300))
    return {name: dict(case, name=name, steps=STEPS) for name, case in cases.items()}


@pytest.fixture(scope="module")
def tp_results(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """Every case run by WORLD worker processes at once (their start-up is most of the time)."""
    work = tmp_path_factory.mktemp("tp-run")
    (work / "cases.json").write_text(json.dumps(list(checkpoints.values())))
    # one thread each: Numba's and OpenMP's pools spinning in every rank starve the others
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    logs = [open(work / f"rank{r}.log", "w+") for r in range(WORLD)]
    args = [str(work / "rendezvous"), str(work / "cases.json"), str(work)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(WORLD), *args],
            stdout=logs[r],
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(WORLD)
    ]
    deadline = time.monotonic() + 300
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        logs[failed[0]].seek(0)
        pytest.fail(f"tensor-parallel rank {failed[0]} failed:\n{logs[failed[0]].read()[-4000:]}")
    return {name: torch.load(work / f"{name}.pt") for name in checkpoints}


@pytest.mark.parametrize(
    "name", ["llama-2", "llama-4", "qwen2-2", "qwen2-3", "smollm2-3", *(f"{n}-2" for n in OTHERS)]
)
def test_tensor_parallel_logits_and_greedy_tokens_equal_one_process(checkpoints, tp_results, name):
    case = checkpoints[name]
    torch.set_num_threads(2)
    want_logits, want_tokens = tp_worker.run_case(case, TPInfo())
    got = tp_results[name]
    assert got["logits"].shape == want_logits.shape  # [T, the whole vocabulary]
    diff = (got["logits"] - want_logits).abs().max().item()
    assert diff <= RTOL * want_logits.abs().max().item(), diff
    assert got["tokens"] == want_tokens


def config_of(**fields) -> ModelConfig:
    base = dict(
        architecture="llama",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
    )
    return ModelConfig(**{**base, **fields})


def test_the_default_model_over_two_ranks_is_refused_before_loading_naming_what_works(default_model_path):
    checkpoint = open_checkpoint(default_model_path)
    config = checkpoint.config
    assert tensor_parallel_sizes(config) == [1, 3]
    want = (
        "9 attention heads do not split over 2 tensor-parallel ranks (the model has 9 attention "
        "heads and 3 key/value heads); --tensor-parallel-size 1 or 3 would work"
    )
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(config, 2)
    assert str(err.value) == want
    with pytest.raises(ValueError, match="9 attention heads do not split over 2") as err:
        load_model(checkpoint, tp=TPInfo(0, 2))  # no process group: it must not get that far
    assert not isinstance(err.value, FormatError)


def test_sizes_follow_heads_kv_heads_and_intermediate_sizes():
    # KV heads split where there are at least as many as ranks, else are shared evenly
    assert tensor_parallel_sizes(config_of()) == [1, 2, 4, 8]
    assert tensor_parallel_sizes(config_of(num_attention_heads=12, num_key_value_heads=4)) == [1, 2, 4]
    assert tensor_parallel_sizes(config_of(num_attention_heads=6, num_key_value_heads=1)) == [1, 2, 3, 6]
    assert tensor_parallel_sizes(config_of(intermediate_size=100)) == [1, 2, 4]
    moe = config_of(intermediate_size=0, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=36)
    assert tensor_parallel_sizes(moe) == [1, 2, 4]
    with pytest.raises(ValueError, match="the experts' intermediate size 36 does not split over 8"):
        check_tensor_parallel(moe, 8)
    with pytest.raises(ValueError, match=r"3 key/value heads do not split over 2 .* 1, 3 or 6 would work"):
        check_tensor_parallel(config_of(num_attention_heads=6, num_key_value_heads=3), 2)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_a_ranks_kv_cache_spec_comes_from_the_config_alone(size):
    config = config_of()
    for rank in range(size):
        (spec,) = kv_cache_spec(config, TPInfo(rank, size))
        assert (spec.num_kv_heads, spec.head_dim) == (max(1, 2 // size), 8)
