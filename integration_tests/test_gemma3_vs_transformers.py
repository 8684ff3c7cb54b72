"""Gemma 3 270M (the real Q4_K_M GGUF) against transformers loading the same file: fp32 logits,
greedy continuations (up to near-ties of transformers' own logits), a prompt past the sliding
window, and the KV blocks the hybrid cache holds at long contexts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tessera.engine import LLM
from tessera.formats import open_checkpoint
from tessera.models import load_model
from tessera.models.harness import forward_chunks
from tessera.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki.utf8"
LOGIT_ATOL = 2e-3  # fp32 both sides, same dequantized weights; measured max 3e-5 on logits up to ~30
NEAR_TIE = 1e-2  # a greedy step may differ only where transformers' top two logits are this close
PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def hf(gemma3_model_path):
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gemma3_model_path.parent, gguf_file=gemma3_model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(gemma3_model_path):
    return open_checkpoint(gemma3_model_path)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_model(checkpoint, torch.float32)


def _long_prompt(tok, n: int) -> list[int]:
    if not WIKI.is_file():
        pytest.skip(f"{WIKI} is absent (../shared/data holds the evaluation text)")
    text = re.sub(r"<[^>]+>", "", WIKI.read_text(encoding="utf-8")[:200_000])
    ids = tok.encode(text)
    assert len(ids) >= n
    return ids[:n]


def test_fp32_logits_of_a_ragged_chunked_batch_match_transformers(checkpoint, ours, hf):
    tok = checkpoint.tokenizer()
    seqs = [tok.encode(p) for p in PROMPTS]
    chunks = [[s[:5], s[5:9], s[9:]] for s in seqs]
    got = forward_chunks(ours, chunks, block_size=16)
    for ids, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0]
        diff = (logits - want).abs().max().item()
        assert diff < LOGIT_ATOL, diff


def _near_tie_misses(hf, prompt: list[int], generated: list[int]) -> list[tuple[int, int, int]]:
    """Steps where our token is not transformers' greedy choice up to NEAR_TIE of its own
    logits: (step, ours, theirs)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
    return [
        (i, token, logits[i].argmax().item())
        for i, token in enumerate(generated)
        if logits[i, token].item() < logits[i].max().item() - NEAR_TIE
    ]


def test_greedy_continuations_match_transformers(gemma3_model_path, hf):
    llm = LLM(str(gemma3_model_path), dtype="float32", max_model_len=512, kv_cache_memory=64 * 2**20)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
                0, len(ids) :
            ].tolist()
        assert len(out.token_ids) == 24
        # a difference is allowed only through a near-tie of transformers' own logits
        assert out.token_ids == theirs or not _near_tie_misses(hf, ids, list(out.token_ids))


def test_a_2048_token_prompt_past_the_window_matches_transformers(gemma3_model_path, checkpoint, ours, hf):
    """Four times the 512-token window: the sliding layers must see only their window, from
    the engine's hybrid cache (out-of-window blocks given back) as from the harness."""
    tok = checkpoint.tokenizer()
    ids = _long_prompt(tok, 2048)
    (got,) = forward_chunks(ours, [[ids[i : i + 512] for i in range(0, 2048, 512)]], block_size=16)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    tail = slice(1500, 2048)
    assert (got[tail] - want[tail]).abs().max().item() < LOGIT_ATOL
    llm = LLM(
        str(gemma3_model_path),
        dtype="float32",
        max_model_len=4096,
        kv_cache_memory=64 * 2**20,
        max_num_batched_tokens=512,
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate([ids], params)
    assert len(out.token_ids) == 8
    assert not _near_tie_misses(hf, ids, list(out.token_ids))


@pytest.mark.parametrize("context", [8192, 32768])
def test_kv_bytes_held_at_long_contexts_are_what_the_window_allows(gemma3_model_path, context):
    """The engine's own KV manager (Gemma 3's 3 full + 15 sliding layers in groups of 3) taken
    through a context in 2,048-token prefill chunks: the full group holds every block, each
    sliding group only the blocks its window (512) can still see."""
    llm = LLM(str(gemma3_model_path), max_model_len=context, kv_cache_memory=256 * 2**20)
    kv = llm.engine.scheduler.kv
    groups = llm.kv_groups
    bs = kv.block_size
    assert [g.spec.sliding_window for g in groups.groups] == [None] + [512] * 5
    tokens = list(range(context))
    kv.get_computed_blocks("r", tokens)
    done = 0
    while done < context:
        step = min(2048, context - done)
        assert kv.allocate_slots("r", done + step, num_computed_tokens=done) is not None
        done += step
    # then one decode step: the next token sees the last 511 keys in a sliding layer
    assert kv.allocate_slots("r", context + 1, num_computed_tokens=context) is not None
    held = kv.num_held_blocks("r")
    bytes_per_block = llm.kv_cache_bytes // kv.num_blocks
    # a cache without windows: every group holding what the full-attention group holds
    full_cache = len(groups) * held[0] * bytes_per_block
    held_bytes = sum(held) * bytes_per_block
    print(
        f"\ncontext {context}: blocks held per group {held}, {held_bytes / 2**20:.1f} MiB "
        f"vs {full_cache / 2**20:.1f} MiB for a full cache ({held_bytes / full_cache:.3f})"
    )
    assert held[0] == context // bs + 1
    window_blocks = context // bs - (context - 511) // bs + 1  # positions context-511 .. context
    assert held[1:] == [window_blocks] * 5
    # 3 of 18 layers keep everything, 15 keep 512 tokens: 1/6 of the bytes plus the windows
    assert held_bytes / full_cache < (0.185 if context == 32768 else 0.225)
    kv.free("r")
    assert kv.num_free_blocks == kv.num_blocks
