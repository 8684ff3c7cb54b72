"""An EXL2 folder of a tiny random-weight Llama through our loader and engine, against HF
transformers' LlamaForCausalLM holding the same quantized weights.

The folder is written with ``write_exl2_folder``; its linears mix bit widths inside one matrix
(6, 5, 4 and 3 bits along the 128 inputs of the attention and gate/up projections; 8, 6, 5, 4, 3
and two 2-bit groups of 16 along the 256 inputs of down_proj; 6 then 4 bits in lm_head) behind a
random input permutation. The weights transformers holds are computed here, as
``exact_scale * (q - 2^(b-1))`` from the integers and grid scales this test rounded, never read
back from the folder; test_exl2.py checks our reading against a reference written from
exllamav2's source.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.engine import LLM  # noqa: E402
from tessera.formats import GroupQuant, exl2_scale_grid, open_checkpoint, write_exl2_folder  # noqa: E402
from tessera.models import load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402
from tessera.sampling import SamplingParams  # noqa: E402

from .hf_reference import hf_greedy  # noqa: E402

# vocabulary of 160 tokens, shared with the GPTQ fixtures' tokenizer
TOKENIZER = Path(__file__).parents[1] / "packages/formats/tests/fixtures/gptq/gptq-3bit-g32-sym-v1"
PROMPT = [3, 17, 42, 99, 5, 150, 77, 8, 23, 64, 111, 2]
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 160,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.08,
    "torch_dtype": "float16",
}
SIGNATURE = {
    "quant_method": "exl2",
    "version": "0.3.2",
    "bits": 4.6,
    "head_bits": 4,
    "calibration": {"rows": 0, "length": 0, "dataset": "(none: round to nearest)"},
}
# (group starts, bits) by number of inputs; lm_head as exllamav2's head_bits 4 mixes (6, 4)
MIX = {
    128: ((0, 32, 64, 96, 128), (6, 5, 4, 3)),
    256: ((0, 32, 64, 128, 192, 224, 240, 256), (8, 6, 5, 4, 3, 2, 2)),
}
HEAD_MIX = ((0, 32, 128), (6, 4))
FP32_ATOL = 1e-4  # fp32 on both sides, same weights: only summation order differs


def quantize(w: torch.Tensor, starts, bits, gen) -> tuple[GroupQuant, torch.Tensor]:
    """Round-to-nearest EXL2 of ``w`` behind a random permutation, absmax scales put on EXL2's
    grid first: the GroupQuant and its weights in input order."""
    n_out, n_in = w.shape
    perm = torch.randperm(n_in, generator=gen)
    stored = w[:, perm]
    sizes = torch.tensor([b - a for a, b in zip(starts, starts[1:], strict=False)])
    col = torch.repeat_interleave(torch.arange(len(bits)), sizes)
    mid = torch.tensor([2.0 ** (b - 1) for b in bits])
    absmax = torch.stack([stored[:, a:b].abs().amax(1) for a, b in zip(starts, starts[1:], strict=False)], 1)
    _, _, scale = exl2_scale_grid(absmax / mid)
    q = torch.minimum((torch.round(stored / scale[:, col]) + mid[col]).clamp(min=0), 2 * mid[col] - 1)
    dense = torch.empty_like(w)
    dense[:, perm] = scale[:, col] * (q - mid[col])
    zero = mid.expand(n_out, -1).contiguous()
    return GroupQuant((n_out, n_in), q.to(torch.uint8), scale, zero, starts, bits, perm), dense


@pytest.fixture(scope="module")
def exl2_model(tmp_path_factory):
    """``(folder, transformers model on the quantized weights, fp32)``."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float().eval()
    gen = torch.Generator().manual_seed(1)
    tensors, dense = {}, {}
    for name, w in hf.state_dict().items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            starts, bits = HEAD_MIX if name == "lm_head.weight" else MIX[w.shape[1]]
            tensors[name], dense[name] = quantize(w.float(), starts, bits, gen)
        else:
            tensors[name] = w.half()
            dense[name] = tensors[name].float()
    hf.load_state_dict(dense, strict=True)
    extra = {n: TOKENIZER / n for n in ("tokenizer.json", "tokenizer_config.json")}
    folder = write_exl2_folder(
        tmp_path_factory.mktemp("exl2") / "llama", CONFIG, tensors, SIGNATURE, None, extra
    )
    return folder, hf


def test_our_fp32_logits_equal_transformers_on_the_same_quantized_weights(exl2_model):
    folder, hf = exl2_model
    ours = load_model(open_checkpoint(folder), torch.float32)
    (got,) = forward_chunks(ours, [[PROMPT[:5], PROMPT[5:]]], block_size=4)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
    assert want.abs().max() > 0.5  # logits large enough for a wrong scale or bit to show
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)


def test_the_packed_path_runs_exl2_groups_from_gguf_blocks_within_fp16_rounding(exl2_model):
    """With packed weights every EXL2 linear whose groups are whole 32-blocks runs as GGUF blocks
    behind its input permutation (an InputSegments); down_proj, with 2-bit groups of 16 inputs,
    falls back to its dequantized weight. The blocks hold the exact scales (fp16 on EXL2's grid)
    and ``-scale * 2^(b-1)`` (exact in fp16), so what moves the logits is the backend's own
    rounding of activations: bounded by a tenth of what running the model in bf16 does."""
    from tessera.kernels import InputSegments
    from tessera.kernels_cpu import native

    if native.library() is None:
        pytest.skip("no C kernels on this machine")
    folder, hf = exl2_model
    ours = load_model(open_checkpoint(folder), torch.float32, packed_weights=True)
    assert all(isinstance(ly.self_attn.o_proj.weight, InputSegments) for ly in ours.layers)
    assert all(isinstance(ly.mlp.down_proj.weight, torch.Tensor) for ly in ours.layers)
    (got,) = forward_chunks(ours, [[PROMPT[:5], PROMPT[5:]]], block_size=4)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
        bf16 = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor([PROMPT])).logits[0].float()
    assert (got - want).abs().max() <= 0.1 * (bf16 - want).abs().max()


def test_engine_greedy_generation_equals_transformers(exl2_model):
    folder, hf = exl2_model
    llm = LLM(
        str(folder),
        dtype="float32",
        block_size=4,
        kv_cache_memory=256 * 1024,
        max_model_len=128,
        max_num_batched_tokens=16,
    )
    prompts = [PROMPT, PROMPT[3:10]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for ids, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, 16)


def test_an_unsigned_folder_named_as_exllamav2_writes_it_loads_the_same(exl2_model, tmp_path):
    """exllamav2 without ``-cf`` leaves the original config.json (no quantization_config) and
    names its weights output.safetensors: the q_weight tensors alone say EXL2."""
    folder, hf = exl2_model
    unsigned = tmp_path / "unsigned"
    shutil.copytree(folder, unsigned)
    config = json.loads((unsigned / "config.json").read_text())
    del config["quantization_config"]
    (unsigned / "config.json").write_text(json.dumps(config))
    (unsigned / "model.safetensors").rename(unsigned / "output.safetensors")
    ours = load_model(open_checkpoint(unsigned), torch.float32)
    (got,) = forward_chunks(ours, [[PROMPT]])
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)
