"""Tiny random-weight Llama, Mistral and Qwen2 models: our logits against HF transformers
running the same weights (saved as an HF folder and read back through tessera.formats)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.formats import open_checkpoint  # noqa: E402
from tessera.models import load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
# max abs logit difference allowed: fp32 with a different summation order than transformers
# (the CPU backend's attention differs from the reference's; logits here are of size ~5-10,
# measured differences up to 3e-5)
ATOL = 1e-4


def build_hf(tmp_path, config_cls, max_shard_size=None, **overrides):
    """A random model with weights large enough that mistakes show in the logits."""
    torch.manual_seed(0)
    config = config_cls(**{**COMMON, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path, **kwargs)
    return model.eval()


def run_ragged(model, chunks, block_size=4, seed=0):
    return forward_chunks(model, chunks, block_size, seed)


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def prompts(lengths, vocab=160, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


CASES = {
    "llama3-rope": (
        transformers.LlamaConfig,
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "llama-linear-rope": (
        transformers.LlamaConfig,
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "llama-biases-tied": (
        transformers.LlamaConfig,
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "mistral-sliding-window": (transformers.MistralConfig, dict(sliding_window=7)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_prompt_logits_match_transformers(tmp_path, case):
    cls, overrides = CASES[case]
    hf = build_hf(tmp_path, cls, **overrides)
    ours = load_model(open_checkpoint(tmp_path))
    (ids,) = prompts([37])
    (got,) = run_ragged(ours, [[ids]])
    assert (got - hf_logits(hf, ids)).abs().max().item() < ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_ragged_batch_with_chunked_prefill_and_decode_matches_transformers(tmp_path, case):
    """Four sequences of different lengths in one batch: chunks of prefill, then single-token
    decode steps over the paged cache (lengths straddle block boundaries)."""
    cls, overrides = CASES[case]
    hf = build_hf(tmp_path, cls, **overrides)
    ours = load_model(open_checkpoint(tmp_path))
    seqs = prompts([1, 9, 23, 40], seed=2)
    chunked = [
        [seqs[0]],
        [seqs[1][:5], seqs[1][5:]],
        [seqs[2][:16], seqs[2][16:17], seqs[2][17:18], seqs[2][18:]],
        [seqs[3][:13], seqs[3][13:30], seqs[3][30:31], seqs[3][31:]],
    ]
    got = run_ragged(ours, chunked, block_size=4, seed=3)
    for ids, logits in zip(seqs, got, strict=True):
        assert (logits - hf_logits(hf, ids)).abs().max().item() < ATOL


def test_dynamic_ntk_rope_past_the_trained_length_matches_transformers(tmp_path):
    hf = build_hf(
        tmp_path,
        transformers.LlamaConfig,
        max_position_embeddings=24,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    ours = load_model(open_checkpoint(tmp_path))
    for n in (20, 45):  # below and beyond max_position_embeddings
        (ids,) = prompts([n], seed=n)
        (got,) = run_ragged(ours, [[ids]])
        assert (got - hf_logits(hf, ids)).abs().max().item() < ATOL


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    hf = build_hf(tmp_path / "sharded", transformers.LlamaConfig, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = load_model(open_checkpoint(tmp_path / "sharded"))
    (ids,) = prompts([11])
    (got,) = run_ragged(ours, [[ids]])
    assert (got - hf_logits(hf, ids)).abs().max().item() < ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    hf = build_hf(tmp_path / "f32", transformers.LlamaConfig)
    hf.to(dtype).save_pretrained(tmp_path / "half")
    ours = load_model(open_checkpoint(tmp_path / "half"), dtype=torch.float32)
    (ids,) = prompts([9])
    (got,) = run_ragged(ours, [[ids]])
    # the same rounded weights computed in fp32 on both sides
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32)
    assert (got - hf_logits(ref.eval(), ids)).abs().max().item() < ATOL
