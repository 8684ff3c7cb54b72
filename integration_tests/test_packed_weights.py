"""The default model with its GGUF weights kept packed (the CPU's quantized kernels) against the
reference path that dequantizes them at load: the same greedy tokens up to near-ties of
transformers' logits, and perplexity within 0.5% of llama.cpp's on the same text."""

import math
from pathlib import Path

import pytest
import torch

from tessera.engine import LLM
from tessera.formats import open_checkpoint
from tessera.kernels_cpu import PackedWeight, native
from tessera.models import load_model
from tessera.models.harness import forward_chunks
from tessera.sampling import SamplingParams

from .test_default_model_vs_transformers import NEAR_TIE, PROMPTS

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C kernels on this machine")

GPL3 = Path("/usr/share/common-licenses/GPL-3")
LLAMA_CPP_PPL = 23.79  # llama.cpp on the first 2,048 tokens, 4 windows of 512 (shared/data/README.md)


def test_fp32_greedy_tokens_match_the_dequantized_path(default_model_path, hf_default_model):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache_memory=64 * 2**20, max_model_len=256)
    fast = LLM(str(default_model_path), quantized_weights="packed", **kw)
    assert isinstance(fast.model.layers[0].mlp.gate_up_weight, PackedWeight)
    assert isinstance(fast.model.lm_head, PackedWeight)  # the tied Q8_0 embedding, packed once
    ref = LLM(str(default_model_path), quantized_weights="dequantize", **kw)
    compared = 0
    for prompt, a, b in zip(
        PROMPTS, fast.generate(PROMPTS, params), ref.generate(PROMPTS, params), strict=True
    ):
        ids = ref.tokenizer.encode(prompt) + b.token_ids
        with torch.no_grad():
            logits = hf_default_model(torch.tensor([ids])).logits[0, -25:-1]
        top2 = logits.topk(2).values
        for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            if (top2[step, 0] - top2[step, 1]).item() < NEAR_TIE:
                break
            assert x == y, f"{prompt!r} step {step}"
            compared += 1
    assert compared >= 0.8 * len(PROMPTS) * 24


@pytest.mark.skipif(not GPL3.is_file(), reason=f"{GPL3} is absent (Debian's base-files installs it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perplexity_is_within_half_a_percent_of_llama_cpp(default_model_path, dtype):
    ck = open_checkpoint(default_model_path)
    model = load_model(ck, dtype=dtype, packed_weights=True)
    tokens = ck.tokenizer().encode(GPL3.read_text(encoding="utf-8"), add_special_tokens=False)[:2048]
    nll, count = 0.0, 0
    for i in range(0, 2048, 512):
        w = tokens[i : i + 512]
        (logits,) = forward_chunks(model, [[w]], block_size=16)
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll -= logp.gather(1, torch.tensor(w[1:])[:, None]).sum().item()
        count += len(w) - 1
    ppl = math.exp(nll / count)
    assert abs(ppl / LLAMA_CPP_PPL - 1) < 0.005, ppl
