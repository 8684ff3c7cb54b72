"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same
GGUF in fp32: logits of single prompts and of a ragged batch, and greedy continuations."""

import pytest
import torch

from tessera.formats import open_checkpoint
from tessera.models import load_model
from tessera.models.harness import forward_chunks
from tessera.sampling import SamplingParams

# Max abs logit difference allowed. Both sides dequantize the same blocks exactly (see
# test_gguf_dequant) and compute in fp32; what remains is summation order across 30 layers
# with logits of magnitude ~20-30, measured at ~5e-5. 2e-4 leaves headroom, and is still far
# below the gaps that decide a greedy token.
ATOL = 2e-4
# top-1 minus top-2 logit below which a greedy step is a coin toss for any change of order
NEAR_TIE = 0.01

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
]


@pytest.fixture(scope="module")
def ours(default_model_path):
    return load_model(open_checkpoint(default_model_path))


@pytest.fixture(scope="module")
def tok(default_model_path):
    return open_checkpoint(default_model_path).tokenizer()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_single_prompt_logits_match_transformers(ours, tok, hf_default_model, prompt):
    ids = tok.encode(prompt)
    (got,) = forward_chunks(ours, [[ids]], block_size=16)
    diff = (got - hf_logits(hf_default_model, ids)).abs().max().item()
    assert diff < ATOL, diff


def test_four_prompts_of_different_lengths_in_one_batch_match_transformers(ours, tok, hf_default_model):
    seqs = [tok.encode(p) for p in PROMPTS[:4]]
    assert len({len(s) for s in seqs}) == 4
    got = forward_chunks(ours, [[s] for s in seqs], block_size=16, seed=5)
    for ids, logits in zip(seqs, got, strict=True):
        diff = (logits - hf_logits(hf_default_model, ids)).abs().max().item()
        assert diff < ATOL, diff


def hf_greedy(hf, ids, steps):
    """transformers' greedy tokens with its own top-1/top-2 margin at each step."""
    tokens, margins = [], []
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        for _ in range(steps):
            logits = out.logits[0, -1].float()
            top = logits.topk(2).values
            t = int(logits.argmax())
            tokens.append(t)
            margins.append(float(top[0] - top[1]))
            out = hf(torch.tensor([[t]]), cache=out.cache, use_cache=True)
    return tokens, margins


def test_greedy_continuations_match_transformers_up_to_near_ties(default_llm, tok, hf_default_model):
    """All prompts run together through the engine (one batch), 32 greedy tokens each."""
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = default_llm.generate(PROMPTS, params)
    compared = 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref, margins = hf_greedy(hf_default_model, tok.encode(prompt), 32)
        assert len(out.token_ids) == 32 and out.finish_reason == "length"
        for step, (a, b, m) in enumerate(zip(out.token_ids, ref, margins, strict=True)):
            if m < NEAR_TIE:
                break  # past here either token is a faithful greedy choice
            assert a == b, f"{prompt!r}: step {step} gave {a}, transformers {b} (margin {m:.4f})"
            compared += 1
    assert compared >= 100  # most steps are decided ones


def test_generated_text_is_the_detokenized_tokens(default_llm):
    (out,) = default_llm.generate(
        ["Write a haiku about the moon."], SamplingParams(temperature=0, max_tokens=24)
    )
    assert out.text == default_llm.tokenizer.decode(out.token_ids)


# measured max |logit change|: int8 0.88, fp8 2.47 (logits range about +-25)
@pytest.mark.parametrize("kv_dtype,bound", [(torch.int8, 1.5), (torch.float8_e4m3fn, 4.0)])
def test_quantized_kv_cache_stays_close_to_full_precision(ours, tok, kv_dtype, bound):
    """int8/fp8 KV with per-token scales: logits move by a bounded amount and the argmax of
    confident positions does not change (perplexity cost in BENCHMARKS.md)."""
    ids = tok.encode(PROMPTS[2] + " " + PROMPTS[4])
    (full,) = forward_chunks(ours, [[ids]], block_size=16)
    (quant,) = forward_chunks(ours, [[ids[:9], ids[9:]]], block_size=16, kv_dtype=kv_dtype)
    assert (full - quant).abs().max().item() < bound
    top2 = full.topk(2).values
    confident = (top2[:, 0] - top2[:, 1]) > 1.0
    assert torch.equal(full.argmax(-1)[confident], quant.argmax(-1)[confident])
