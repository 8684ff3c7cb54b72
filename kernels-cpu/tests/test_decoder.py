"""The fused decoder stack (one C call per step) against the op-by-op path it replaces: the
same kernels in the same order, so the logits and the KV cache must agree to the bit."""

import dataclasses

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import quantize  # noqa: E402

from tessera.formats import ModelConfig, QuantizedTensor  # noqa: E402
from tessera.kernels import DecoderLayerSpec, LinearWeights, RowStack, reference, registry  # noqa: E402
from tessera.kernels_cpu import decoder, native, packed  # noqa: E402
from tessera.models import LoadOptions  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402
from tessera.models.llama import LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C kernels on this machine")

K_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def packed_weight(scheme: str, n: int, k: int, rng) -> packed.PackedWeight:
    if scheme in K_BYTES:  # gguf cannot quantize K-quants: random blocks with sane scales
        raw = rng.integers(0, 256, (n * k // 256, K_BYTES[scheme]), dtype=np.uint8)
        scales = rng.uniform(0.0005, 0.004, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
        if scheme == "Q6_K":
            raw[:, 208:210] = scales[:, :2]
        else:
            raw[:, 0:4] = scales
    else:
        w = (rng.standard_normal((n, k)) * 0.08).astype(np.float32)
        raw = quantize(w, gguf.GGMLQuantizationType[scheme])
    qt = QuantizedTensor(scheme, torch.from_numpy(raw.reshape(n, -1).view(np.uint8)).clone(), (n, k))
    pw = packed.prepare_linear_weight(qt, torch.bfloat16)
    assert isinstance(pw, packed.PackedWeight)
    return pw


def random_model(
    schemes, qkv_bias: bool, window_layer: int | None, seed: int = 0, mixed_qkv: bool = False
) -> LlamaForCausalLM:
    """A 3-layer Llama model in bf16 with random packed weights, set directly on its layers'
    ``DecoderLayerSpec``s (what the fused stack reads)."""
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=300,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        qkv_bias=qkv_bias,
        sliding_window=6 if window_layer is not None else None,
        layer_types=None
        if window_layer is None
        else tuple("sliding_attention" if i == window_layer else "full_attention" for i in range(3)),
    )
    rng = np.random.default_rng(seed)
    model = LlamaForCausalLM(cfg, LoadOptions(torch.bfloat16))
    g = torch.Generator().manual_seed(seed)

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    model.embed_tokens.weight = bf16(300, 256)
    model.lm_head.weight = bf16(300, 256, scale=0.05)
    model.norm.weight = 1 + bf16(256, scale=0.1)
    s = iter(schemes * 12)
    specs = []
    for i in range(3):
        if mixed_qkv and i == 1:  # q, k and v in different schemes, as in a Q4_K_M file
            qkv = RowStack([packed_weight(next(s), n, 256, rng) for n in (8 * 32, 2 * 32, 2 * 32)])
        else:
            qkv = packed_weight(next(s), (8 + 2 * 2) * 32, 256, rng)
        specs.append(
            DecoderLayerSpec(
                input_norm=1 + bf16(256, scale=0.1),
                post_attention_norm=1 + bf16(256, scale=0.1),
                qkv=LinearWeights(qkv, bf16((8 + 2 * 2) * 32, scale=0.1) if qkv_bias else None),
                o=LinearWeights(packed_weight(next(s), 256, 256, rng)),
                gate_up=LinearWeights(packed_weight(next(s), 1024, 256, rng)),
                down=LinearWeights(packed_weight(next(s), 256, 512, rng)),
                num_heads=8,
                num_kv_heads=2,
                head_dim=32,
                scale=32**-0.5,
                eps=cfg.rms_norm_eps,
                sliding_window=cfg.layer_window(i),
            )
        )
    model.layer_specs = specs
    return model


CHUNKS = [
    [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [30, 31, 32], [40], [41]],
    [[50, 51, 52, 53, 54], [55], [56], [57]],
    [[], list(range(100, 140)), [141], [142]],
]


@pytest.mark.parametrize(
    "schemes,qkv_bias,window_layer",
    [
        (["Q4_0", "Q8_0", "Q4_1", "Q4_0"], False, None),
        (["Q4_K", "Q6_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"], True, 1),
    ],
)
@pytest.mark.parametrize("block_size", [4, 16])
def test_fused_stack_is_bit_identical_to_the_op_by_op_path(
    monkeypatch, schemes, qkv_bias, window_layer, block_size
):
    model = random_model(schemes, qkv_bias, window_layer)
    op_by_op = reference.decoder_layers
    try:
        registry.unregister("decoder_layers", "cpu")
        want = forward_chunks(model, CHUNKS, block_size=block_size)
    finally:
        registry.register("decoder_layers", "cpu")(decoder.decoder_layers)

    def no_fallback(*args):
        raise AssertionError("the fused stack fell back to the op-by-op path")

    monkeypatch.setattr(decoder.reference, "decoder_layers", no_fallback)
    got = forward_chunks(model, CHUNKS, block_size=block_size)
    monkeypatch.setattr(decoder.reference, "decoder_layers", op_by_op)
    for g_, w_ in zip(got, want, strict=True):
        assert torch.isfinite(w_).all()
        assert torch.equal(g_, w_)


@pytest.mark.parametrize("why", ["a dense weight", "an int8 KV cache"])
def test_layers_it_does_not_take_run_op_by_op(monkeypatch, why):
    model = random_model(["Q4_0"], False, None)
    kv_dtype = None
    if why == "a dense weight":
        spec = model.layer_specs[1]
        dense = LinearWeights(spec.down.weight.dequantize(torch.bfloat16))
        model.layer_specs[1] = dataclasses.replace(spec, down=dense)
    else:
        kv_dtype = torch.int8
    calls = []
    real = reference.decoder_layers

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(decoder.reference, "decoder_layers", spy)
    (logits, *_) = forward_chunks(model, CHUNKS, block_size=4, kv_dtype=kv_dtype)
    assert calls and torch.isfinite(logits).all()


def test_a_plan_follows_replaced_weights_and_goes_with_its_model():
    import gc

    model = random_model(["Q4_0"], False, None)
    (before,) = forward_chunks(model, CHUNKS[:1], block_size=4)
    assert model.layer_specs[0] in decoder._plans
    # a weight swapped after the first step: the next step uses the new one
    new = random_model(["Q8_0"], False, None, seed=5).layer_specs[2].down
    model.layer_specs[2] = dataclasses.replace(model.layer_specs[2], down=new)
    (after,) = forward_chunks(model, CHUNKS[:1], block_size=4)
    try:
        registry.unregister("decoder_layers", "cpu")
        (want,) = forward_chunks(model, CHUNKS[:1], block_size=4)
    finally:
        registry.register("decoder_layers", "cpu")(decoder.decoder_layers)
    assert torch.equal(after, want) and not torch.equal(after, before)
    gc.collect()  # models of earlier tests (engines hold reference cycles) go first
    n = len(decoder._plans)
    del model
    gc.collect()
    assert len(decoder._plans) == n - 1


def test_tensor_parallel_layers_run_op_by_op_and_sum_after_o_and_the_mlp(monkeypatch):
    """A rank's part of a layer: o's and down's outputs are partial sums to all-reduce between
    ops, which one C call cannot do. With a stand-in all-reduce (the other ranks adding zeros)
    the logits are the one-rank stack's to the bit."""
    model = random_model(["Q4_0"], False, None)
    (want,) = forward_chunks(model, CHUNKS[:1], block_size=4)
    model.layer_specs = [dataclasses.replace(s, tp_size=2) for s in model.layer_specs]
    reduced = []

    def all_reduce(x):
        reduced.append(tuple(x.shape))
        return x

    calls = []
    real = reference.decoder_layers

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(decoder.reference, "decoder_layers", spy)
    registry.register("all_reduce", "cpu")(all_reduce)
    try:
        (got,) = forward_chunks(model, CHUNKS[:1], block_size=4)
    finally:
        registry.unregister("all_reduce", "cpu")
    steps = len(CHUNKS[0])
    assert len(calls) == steps and torch.equal(got, want)
    tokens = [len(chunk) for chunk in CHUNKS[0]]
    assert reduced == [(t, 256) for t in tokens for _ in range(2 * 3)]  # o and down of 3 layers
