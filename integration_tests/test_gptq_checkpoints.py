"""GPTQ and AWQ checkpoints made by GPTQModel 7.7.0 and AutoAWQ 0.2.9 (tools/make_gptq_fixtures.py;
the folders in packages/formats/tests/fixtures/gptq) through our loader and engine:

- our fp32 logits equal HF transformers' fp32 Llama holding the same dequantized weights (the
  model transformers builds from the folder's config, with every quantized linear's weight set to
  our ``dequantize()``, which test_gptq.py checks against GPTQModel's own dequantization);
- the tool's own logits (GPTQModel runs in bfloat16, AutoAWQ in float16) are within bfloat16 noise
  of those weights' fp32 logits: no further from them than transformers in bfloat16 is, up to a
  stated factor;
- ``LLM`` greedy generation equals transformers' on those weights.
"""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tessera.engine import LLM  # noqa: E402
from tessera.formats import GPTQTensor, open_checkpoint  # noqa: E402
from tessera.models import load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402
from tessera.sampling import SamplingParams  # noqa: E402

from .hf_reference import hf_greedy  # noqa: E402

FIXTURES = Path(__file__).parents[1] / "packages" / "formats" / "tests" / "fixtures" / "gptq"
CASES = sorted(p.name for p in FIXTURES.iterdir())
PROMPT = [3, 17, 42, 99, 5, 150, 77, 8, 23, 64, 111, 2]  # tools/make_gptq_fixtures.py's PROMPT
# fp32 on both sides, same weights: only summation order differs (logits of magnitude ~10)
FP32_ATOL = 1e-4
# The tool's max logit error against fp32 on our weights, over transformers' bfloat16 error on the
# same weights: measured 0.6-1.6 for GPTQModel's 2/3/4-bit and AWQ, 3.6 for its 8-bit (its 8-bit
# forward rounds more), 0.08 for AutoAWQ (float16); a zero point off by one (v1 offset dropped)
# measured 47.
BF16_FACTOR = 4.0


def transformers_on_our_weights(folder: Path):
    """transformers' LlamaForCausalLM in fp32 from the folder's config (quantization_config
    dropped), every quantized linear holding our dequantized weight."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    state = {
        name: t.dequantize(torch.float32) if isinstance(t, GPTQTensor) else t.float()
        for name, t in open_checkpoint(folder).weights()
    }
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_on_the_same_dequantized_weights(case):
    folder = FIXTURES / case
    ours = load_model(open_checkpoint(folder), torch.float32)
    (got,) = forward_chunks(ours, [[PROMPT[:5], PROMPT[5:]]], block_size=4)
    with torch.no_grad():
        want = transformers_on_our_weights(folder)(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("case", CASES)
def test_gptqmodels_own_logits_are_within_bf16_noise_of_our_weights(case):
    from safetensors.torch import load_file

    folder = FIXTURES / case
    theirs = load_file(folder / "reference.safetensors")["logits"]
    (ours,) = forward_chunks(load_model(open_checkpoint(folder), torch.float32), [[PROMPT]])
    hf = transformers_on_our_weights(folder).to(torch.bfloat16)
    with torch.no_grad():
        hf_bf16 = hf(torch.tensor([PROMPT])).logits[0].float()
    bf16_noise = (hf_bf16 - ours).abs().max()
    assert (theirs - ours).abs().max() <= BF16_FACTOR * bf16_noise


@pytest.mark.parametrize("case", ["gptq-3bit-g32-sym-v1", "awq-4bit-g64-asym-gemm"])
def test_engine_greedy_generation_of_a_quantized_checkpoint_equals_transformers(case):
    folder = FIXTURES / case
    hf = transformers_on_our_weights(folder)
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


@pytest.mark.parametrize(
    "field,value,named",
    [("bits", 5, "quantization_config.bits"), ("quant_method", "hqq", "quantization_config.quant_method")],
)
def test_the_engine_refuses_a_bad_quantization_config_before_loading(tmp_path, field, value, named):
    import shutil

    from tessera.formats import FormatError

    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "gptq-4bit-g32-actorder-asym-v1", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=named):
        LLM(str(folder), dtype="float32", kv_cache_memory=256 * 1024, max_model_len=128)


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_run_packed_from_gguf_blocks(case):
    """With packed weights, every GPTQ/AWQ linear runs on the backend's packed matmul from GGUF
    blocks (no dequantized copy): up to 4 bits as Q4_1, 8 bits as Q8_0, act-order behind an
    input permutation applied to the activations (an InputSegments). m = -scale * zero rounded
    to fp16 (a relative 2^-11 of m) moves the fp32 logits off transformers' on the exact
    weights by a fraction of what bf16 rounding of the same model does: measured 0.0001-0.06
    of transformers' own bf16 error (0 for symmetric zeros, whose m is exact); the bound is 0.2
    of it."""
    from tessera.kernels import InputSegments
    from tessera.kernels_cpu import PackedWeight, native

    if native.library() is None:
        pytest.skip("no C kernels on this machine")
    folder = FIXTURES / case
    ours = load_model(open_checkpoint(folder), torch.float32, packed_weights=True)
    stored = dict(open_checkpoint(folder).weights())
    linears = {"lm_head": ours.lm_head.weight}  # what each module runs on, by its HF name
    for i, ly in enumerate(ours.layers):
        linears[f"model.layers.{i}.self_attn.o_proj"] = ly.self_attn.o_proj.weight
        linears[f"model.layers.{i}.mlp.down_proj"] = ly.mlp.down_proj.weight

    def packed(w, scheme):
        if isinstance(w, InputSegments):
            return w.perm is not None and all(packed(p, scheme) for _, _, p in w.parts)
        return isinstance(w, PackedWeight) and w.scheme == scheme

    for name, w in linears.items():
        t = stored[f"{name}.weight"]
        if isinstance(t, GPTQTensor):  # up to 4 bits as Q4_1, 8 bits as Q8_0
            assert packed(w, "Q8_0" if t.bits == 8 else "Q4_1"), name
            if not t.desc_act:  # (with act-order, a linear of one group keeps its order)
                assert not isinstance(w, InputSegments), name
        else:  # left unquantized (a float head, a module `dynamic` skips): dense
            assert isinstance(w, torch.Tensor), name
    (got,) = forward_chunks(ours, [[PROMPT[:5], PROMPT[5:]]], block_size=4)
    hf = transformers_on_our_weights(folder)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
        bf16_noise = (hf.to(torch.bfloat16)(torch.tensor([PROMPT])).logits[0].float() - want).abs().max()
    err = (got - want).abs().max()
    assert err <= 0.2 * bf16_noise, (err, bf16_noise)
