"""The whole engine (scheduler, paged cache, CPU kernels, sampler) on tiny random-weight models
against transformers' own greedy generation: Mistral with a sliding window shorter than the
prompt (its blocks leave the cache as the window moves) and Qwen2 with biases."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.engine import LLM  # noqa: E402
from tessera.sampling import SamplingParams  # noqa: E402

from .hf_reference import hf_greedy  # noqa: E402

VOCAB = 160


def save_word_tokenizer(folder):
    """A word-level tokenizer over tokens t0..t159, enough for an HF folder to be complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t1"}))


def build(tmp_path, config_cls, **overrides):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **overrides,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    model.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    return model.eval()


@pytest.mark.parametrize(
    "name,config_cls,overrides",
    [
        ("mistral-sliding-window", "MistralConfig", {"sliding_window": 12}),
        ("qwen2-bias", "Qwen2Config", {}),
        # layer 0 full, layer 1 sliding: two kinds of layer in one model
        (
            "qwen2-mixed-layers",
            "Qwen2Config",
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        ),
        (
            "llama3-rope",
            "LlamaConfig",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
    ],
)
def test_engine_greedy_generation_equals_transformers(tmp_path, name, config_cls, overrides):
    hf = build(tmp_path, getattr(transformers, config_cls), **overrides)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 30, 47)]
    llm = LLM(
        str(tmp_path),
        dtype="float32",  # the reference runs in fp32 (on a GPU "auto" would be bf16)
        block_size=4,
        kv_cache_memory=256 * 1024,
        max_model_len=128,
        max_num_batched_tokens=16,
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, 24)
    assert llm.stats().kv_cache_usage == 0.0


def test_sliding_window_requests_hold_only_the_blocks_in_their_window(tmp_path):
    build(tmp_path, transformers.MistralConfig, sliding_window=8)
    llm = LLM(str(tmp_path), dtype="float32", block_size=4, kv_cache_memory=256 * 1024, max_model_len=128)
    kv = llm.engine.scheduler.kv
    assert kv.windows == [8]  # one group: every layer slides
    held = []
    for out in llm.stream(list(range(2, 42)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)):
        if not out.finished:
            (n,) = kv.num_held_blocks(out.request_id)
            held.append(n)
    # the prefill step holds the whole 40-token prompt (10 blocks); from the next step on only the
    # window of 8 tokens is kept: at most 3 blocks plus the one being filled (70 tokens need 18)
    assert held[0] == 10
    assert max(held[1:]) <= 4


def test_the_runner_computes_from_the_schedulers_counts_and_drops_tokens_it_did_not_count(tmp_path):
    hf = build(tmp_path, transformers.MistralConfig, sliding_window=8)
    llm = LLM(  # it reads the runner's state: the runner in this process
        str(tmp_path), dtype="float32", block_size=4, kv_cache_memory=256 * 1024, max_model_len=128,
        distributed_executor_backend="uni",
    )  # fmt: skip
    ids = list(range(2, 22))
    rid = llm.add_request(ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    llm.step()  # the prompt, and the first token
    state = llm.engine.runner.requests[rid]
    # as if two speculative tokens had been appended and then rejected, and the runner's own
    # count had drifted: the scheduler's counts put it right
    state.token_ids += [5, 6]
    state.num_computed_tokens = 3
    out = None
    while llm.has_unfinished_requests():
        for o in llm.step():
            out = o
    assert out.token_ids == hf_greedy(hf, ids, 6)
