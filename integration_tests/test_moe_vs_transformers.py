"""Tiny random-weight Mixtral (top-2 of 8), Qwen2-MoE (shared expert, routing weights not
renormalized, one dense layer) and Qwen3-MoE (QK-norm, renormalized) against transformers
running the same weights: HF folders (per-expert tensors, and transformers 5's fused ones) and
GGUF files written as llama.cpp's converter would (experts in Q8_0 and Q4_0), the latter
compared with transformers on the weights dequantized by gguf's own dequantizer."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tessera.engine import LLM  # noqa: E402
from tessera.formats import FormatError, open_checkpoint  # noqa: E402
from tessera.kernels_cpu import PackedExperts, native  # noqa: E402
from tessera.models import load_model  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402
from tessera.sampling import SamplingParams  # noqa: E402

from .hf_reference import hf_greedy  # noqa: E402
from .tiny_moe import VOCAB, build_hf, load_dequantized, write_gguf  # noqa: E402

MODELS = ["mixtral", "qwen2_moe", "qwen3_moe"]
# max abs logit difference, fp32 against transformers' fp32, for logits of magnitude up to ~20:
# the summation orders differ (paged attention, each token's experts summed in fp32) and these
# random models amplify that through the layers; measured up to 4e-4 (2e-5 of the largest logit)
ATOL = 1e-3


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def ragged(seqs):
    """Chunked prefill of sequences of different lengths in one batch: 3 chunks each."""
    return [[s[: len(s) // 3], s[len(s) // 3 : 2 * len(s) // 3], s[2 * len(s) // 3 :]] for s in seqs]


@pytest.mark.parametrize("name", MODELS)
def test_fp32_logits_equal_transformers_on_single_and_ragged_chunked_batches(tmp_path, name):
    hf = build_hf(name, tmp_path)
    model = load_model(open_checkpoint(tmp_path))
    seqs = prompts((41, 7, 26))
    (single,) = forward_chunks(model, [[seqs[0]]])
    torch.testing.assert_close(single, hf_logits(hf, seqs[0]), atol=ATOL, rtol=0)
    for ids, got in zip(seqs, forward_chunks(model, ragged(seqs), block_size=4, seed=3), strict=True):
        torch.testing.assert_close(got, hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_transformers_5_fused_expert_tensors_load_as_the_per_expert_ones(tmp_path, name):
    """``save_pretrained(save_original_format=False)`` writes ``mlp.experts.gate_up_proj``
    ``[E, 2I, H]``, ``mlp.experts.down_proj`` and (Mixtral) the router as ``mlp.gate``."""
    hf = build_hf(name, tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    model = load_model(open_checkpoint(tmp_path))
    (ids,) = prompts((30,))
    (got,) = forward_chunks(model, [[ids[:11], ids[11:]]])
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_engine_greedy_generation_equals_transformers(tmp_path, name):
    hf = build_hf(name, tmp_path)
    llm = LLM(
        str(tmp_path),
        dtype="float32",  # the reference runs in fp32 (on a GPU "auto" would be bf16)
        block_size=4,
        kv_cache_memory=512 * 1024,
        max_model_len=128,
        max_num_batched_tokens=16,  # prompts arrive in chunks beside other requests' decodes
    )
    seqs = prompts((5, 30, 19), seed=2)
    outs = llm.generate(seqs, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for ids, out in zip(seqs, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, ids, 16)
    assert llm.stats().kv_cache_usage == 0.0


# -- GGUF ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """Per (model, scheme): the GGUF path, and transformers on its dequantized weights in fp32
    and bf16. Weights of std 0.15: larger ones make these tiny models chaotic in bf16 (a
    flipped expert choice moves the logits by tens of percent, in transformers' own bf16 too)."""
    out = {}
    for name in MODELS:
        folder = tmp_path_factory.mktemp(name)
        hf = build_hf(name, folder, std=0.15)
        for scheme in ("Q8_0", "Q4_0"):
            path = folder / f"{name}-{scheme}.gguf"
            # Qwen2-MoE's shared-expert gate as older converters wrote it ([H]) in one of the two
            held = write_gguf(hf, path, scheme, squeeze_shared_gate=scheme == "Q4_0")
            ref = copy.deepcopy(hf)
            load_dequantized(ref, held)
            out[name, scheme] = (path, ref, copy.deepcopy(ref).to(torch.bfloat16))
    return out


CASES = [(n, s) for n in MODELS for s in ("Q8_0", "Q4_0")]


def packed_experts(model, name):
    experts = model.layers[0].mlp if name == "mixtral" else model.layers[0].mlp.experts
    return experts.gate_up, experts.down


@pytest.mark.parametrize("packed", [False, True], ids=["dequantized", "packed"])
@pytest.mark.parametrize("name,scheme", CASES)
def test_gguf_fp32_logits_equal_transformers_on_the_dequantized_weights(gguf_models, name, scheme, packed):
    """Dequantized at load, or kept packed (the CPU's C kernel, fp32 products over the blocks:
    gate and up rows of each expert concatenated as bytes)."""
    path, hf, _ = gguf_models[name, scheme]
    ck = open_checkpoint(path)
    assert ck.config.architecture == name
    if name == "qwen2_moe":
        assert ck.config.dense_layers == (1,) and not ck.config.norm_topk_prob
    model = load_model(ck, packed_weights=packed)
    if packed and native.library() is not None:
        assert all(isinstance(w, PackedExperts) for w in packed_experts(model, name))
    seqs = prompts((33, 12))
    for ids, got in zip(seqs, forward_chunks(model, ragged(seqs)), strict=True):
        torch.testing.assert_close(got, hf_logits(hf, ids), atol=ATOL, rtol=0)


def token_rel_err(got, ref) -> torch.Tensor:
    return (got.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)


@pytest.mark.parametrize("name,scheme", CASES)
def test_gguf_packed_bf16_logits_are_about_as_close_to_fp32_as_transformers_bf16(gguf_models, name, scheme):
    """The CPU default (bf16, packed experts, int8 products) against transformers' fp32 on the
    dequantized weights. bf16 moves a token's router logits enough to flip a near-tied expert
    choice now and then (in transformers' bf16 too, at other tokens), and a flip moves that
    token's logits and, through attention, those after it by tens of percent: so the check is
    statistical. Per-token relative error (L2 over the vocabulary), the median over all
    tokens: at most 2x transformers' own bf16 run's (measured 1.1-1.45x)."""
    path, hf, hf_bf16 = gguf_models[name, scheme]
    model = load_model(open_checkpoint(path), dtype=torch.bfloat16, packed_weights=True)
    if native.library() is not None:
        assert all(isinstance(w, PackedExperts) for w in packed_experts(model, name))
    seqs = prompts((40, 23))
    ours, theirs = [], []
    for ids, got in zip(seqs, forward_chunks(model, ragged(seqs)), strict=True):
        ref = hf_logits(hf, ids)
        ours.append(token_rel_err(got, ref))
        theirs.append(token_rel_err(hf_logits(hf_bf16, ids), ref))
    ours_median, theirs_median = torch.cat(ours).median().item(), torch.cat(theirs).median().item()
    assert ours_median < 2 * theirs_median, (ours_median, theirs_median)


def test_gguf_expert_weights_norm_overrides_the_architectures_default(tmp_path):
    hf = build_hf("qwen3_moe", tmp_path)
    write_gguf(hf, tmp_path / "m.gguf", "Q8_0", meta={"qwen3moe.expert_weights_norm": ("bool", False)})
    assert not open_checkpoint(tmp_path / "m.gguf").config.norm_topk_prob


# -- bad files ------------------------------------------------------------------------------------


def test_a_missing_expert_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    build_hf("mixtral", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        FormatError, match=r"tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight is missing"
    ):
        load_model(open_checkpoint(tmp_path))


def test_a_gguf_expert_stack_of_the_wrong_shape_is_named(tmp_path):
    hf = build_hf("qwen3_moe", tmp_path)

    def drop_an_expert(tensors):
        tensors["blk.1.ffn_gate_exps.weight"] = tensors["blk.1.ffn_gate_exps.weight"][:3]

    write_gguf(hf, tmp_path / "m.gguf", "Q8_0", edit=drop_an_expert)
    with pytest.raises(
        FormatError,
        match=r"m\.gguf: tensor blk\.1\.ffn_gate_exps\.weight has shape \[3, 64, 128\], "
        r"expected \[4, 64, 128\]",
    ):
        load_model(open_checkpoint(tmp_path / "m.gguf"))


def test_a_missing_gguf_expert_stack_is_named_by_its_gguf_name(tmp_path):
    hf = build_hf("mixtral", tmp_path)
    write_gguf(hf, tmp_path / "m.gguf", "Q4_0", edit=lambda t: t.pop("blk.0.ffn_down_exps.weight"))
    with pytest.raises(FormatError, match=r"tensor blk\.0\.ffn_down_exps\.weight is missing \(1 missing\)"):
        load_model(open_checkpoint(tmp_path / "m.gguf"))


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_0"])
def test_mixtral_runs_as_one_fused_stack_close_to_its_op_by_op_path(tmp_path, scheme, monkeypatch):
    """Mixtral's layers (Llama attention, plain routed experts) go to the CPU backend's fused
    decoder stack whole: router, softmax and top-k in C, then the packed experts. It must not
    fall back, and must agree with the op-by-op path on the same weights (not bit for bit: the
    router's sums are C's, not torch's)."""
    from tessera.kernels import reference, registry
    from tessera.kernels_cpu import decoder

    if native.library() is None:
        pytest.skip("no C kernels on this machine")
    path = tmp_path / "m.gguf"
    write_gguf(build_hf("mixtral", tmp_path, std=0.15), path, scheme, attention=True)
    model = load_model(open_checkpoint(path), dtype=torch.bfloat16, packed_weights=True)
    assert model.layer_specs and all(s.moe is not None for s in model.layer_specs)
    seqs = prompts((40, 23))
    try:
        registry.unregister("decoder_layers", "cpu")
        want = forward_chunks(model, ragged(seqs))
    finally:
        registry.register("decoder_layers", "cpu")(decoder.decoder_layers)

    def no_fallback(*args):
        raise AssertionError("the fused stack fell back to the op-by-op path")

    monkeypatch.setattr(decoder.reference, "decoder_layers", no_fallback)
    got = forward_chunks(model, ragged(seqs))
    monkeypatch.setattr(decoder.reference, "decoder_layers", reference.decoder_layers)
    err = torch.cat([token_rel_err(g, w) for g, w in zip(got, want, strict=True)])
    assert err.median().item() < 0.02, err.median().item()
