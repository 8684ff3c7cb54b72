"""Weights in packed input segments behind a permutation (``InputSegments``: GPTQ act-order and
EXL2 mixed bit widths as GGUF blocks) on the C matmul and the fused decoder: products against
the torch reference over the gguf package's own dequantized blocks, a row's result alone and in
a batch, and a tiny random Llama of ``GroupQuant`` weights against its dequantized twin."""

import dataclasses
from itertools import pairwise

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402

from tessera.formats import GroupQuant, ModelConfig, QuantizedTensor  # noqa: E402
from tessera.kernels import (  # noqa: E402
    DecoderLayerSpec,
    InputSegments,
    LinearWeights,
    RowStack,
    reference,
    registry,
)
from tessera.kernels_cpu import decoder, native, packed, segments  # noqa: E402
from tessera.models import LoadOptions  # noqa: E402
from tessera.models.harness import forward_chunks  # noqa: E402
from tessera.models.llama import LlamaForCausalLM  # noqa: E402

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C kernels on this machine")

K_QUANTS = {"Q4_K": 144, "Q6_K": 210}  # bytes per 256-input block


def gguf_blocks(scheme: str, n: int, k: int, rng) -> tuple[QuantizedTensor, torch.Tensor]:
    """A random ``[n, k]`` weight in ``scheme`` and its float64 values by the gguf package's
    dequantizer (K-quants: random blocks with sane scales, as gguf cannot quantize them)."""
    if scheme in K_QUANTS:
        raw = rng.integers(0, 256, (n * k // 256, K_QUANTS[scheme]), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.02, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
        if scheme == "Q6_K":
            raw[:, 208:210] = scales[:, :2]
        else:
            raw[:, 0:4] = scales
    else:
        w = (rng.standard_normal((n, k)) * rng.uniform(0.02, 0.1, (n, 1))).astype(np.float32)
        raw = quantize(w, gguf.GGMLQuantizationType[scheme])
    exact = dequantize(raw, gguf.GGMLQuantizationType[scheme]).astype(np.float64).reshape(n, k)
    qt = QuantizedTensor(scheme, torch.from_numpy(raw.reshape(n, -1).view(np.uint8)).clone(), (n, k))
    return qt, torch.from_numpy(exact)


def segmented(n: int, layout, rng, permuted: bool = True, perm=None):
    """An ``InputSegments`` of packed parts ``[(width, scheme), ...]`` with a random permutation
    (or ``perm``), and its exact float64 weight in input order."""
    parts, stored, k0 = [], [], 0
    for width, scheme in layout:
        qt, exact = gguf_blocks(scheme, n, width, rng)
        pw = packed.prepare_linear_weight(qt, torch.bfloat16)
        assert isinstance(pw, packed.PackedWeight)
        parts.append((k0, k0 + width, pw))
        stored.append(exact)
        k0 += width
    if perm is None and permuted:
        perm = torch.from_numpy(rng.permutation(k0))
    w = torch.cat(stored, dim=1)
    if perm is not None:
        w = torch.empty_like(w).index_copy_(1, perm, w)  # stored column j is input perm[j]
    return InputSegments(perm, parts), w


def q8_inputs(x: torch.Tensor) -> torch.Tensor:
    """x quantized per 32 inputs to int8 with scale max|x| / 127, rounded to nearest even, in
    fp32 (the documented activation quantization of the bf16 path), dequantized."""
    b = x.float().reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(b * inv).clamp(-128, 127) * (amax / 127.0)).reshape(x.shape)


def q8_permuted(x: torch.Tensor, perm) -> torch.Tensor:
    """The bf16 path's inputs: quantized per 32 inputs in the permuted order, put back."""
    if perm is None:
        return q8_inputs(x)
    return torch.empty_like(x, dtype=torch.float32).index_copy_(1, perm, q8_inputs(x[:, perm]))


def rel_err(got, ref) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


LAYOUTS = {
    "8-, 5- and 4-bit forms, permuted": ([(64, "Q8_0"), (96, "Q5_1"), (96, "Q4_1")], True),
    "a K-quant beside 4-bit blocks, permuted": ([(256, "Q4_K"), (32, "Q4_0"), (256, "Q6_K")], True),
    "two segments in input order": ([(128, "Q4_1"), (128, "Q8_0")], False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_segments_match_the_reference_product_of_their_dequantized_blocks(name):
    layout, permuted = LAYOUTS[name]
    rng = np.random.default_rng(len(name))
    w, exact = segmented(48, layout, rng, permuted)
    assert segments.c_parts(w) is not None  # the C matmul takes it, not the generic path
    w_tol = 1e-3 if any(s in K_QUANTS for _, s in layout) else 1e-5  # K-quant scales in fp16
    bias = torch.randn(48, dtype=torch.float64)
    for m in (1, 3, 17):
        x = torch.randn(m, w.shape[1])
        want = reference.linear(x.double(), exact, bias)
        assert rel_err(packed.linear(x, w, bias.float()), want) < w_tol
        xb = x.bfloat16()
        bias_b = bias.bfloat16()
        want_q = reference.linear(q8_permuted(xb, w.perm).double(), exact, bias_b.double())
        got = packed.linear(xb, w, bias_b)
        assert got.dtype == torch.bfloat16 and rel_err(got, want_q) < 4e-3 + w_tol
        got32 = packed.linear(xb, w, bias_b, torch.float32)
        assert got32.dtype == torch.float32 and rel_err(got32, want_q) < 1e-5 + w_tol
    assert packed.linear(torch.randn(2, 5, w.shape[1]), w).shape == (2, 5, 48)


def qkv_stack(rng, same_perm: bool) -> tuple[RowStack, torch.Tensor]:
    """q|k|v, each its own segments; one permutation (equal values, separate tensors, as three
    checkpoint tensors of one Hessian give it) or one each."""
    perm = torch.from_numpy(rng.permutation(256))
    made = [
        segmented(n, layout, rng, perm=perm.clone() if same_perm else None)
        for n, layout in (
            (256, [(64, "Q8_0"), (192, "Q4_1")]),
            (64, [(32, "Q5_1"), (160, "Q4_1"), (64, "Q8_0")]),
            (64, [(256, "Q4_1")]),
        )
    ]
    return RowStack([w for w, _ in made]), torch.cat([e for _, e in made])


@pytest.mark.parametrize("same_perm", [True, False])
def test_a_row_stack_of_segments_multiplies_as_its_parts_side_by_side(same_perm):
    stack, exact = qkv_stack(np.random.default_rng(3), same_perm)
    parts = segments.c_parts(stack)
    ptrs = {p.perm for p in parts.parts}
    assert len(ptrs) == (1 if same_perm else 3)  # shared: x gathered and quantized once
    bias = torch.randn(384, dtype=torch.float64)
    x = torch.randn(5, 256)
    assert rel_err(packed.linear(x, stack, bias.float()), reference.linear(x.double(), exact, bias)) < 1e-5
    xb = x.bfloat16()
    got = packed.linear(xb, stack, bias.bfloat16(), torch.float32)
    for part, (lo, hi) in zip(stack.parts, [(0, 256), (256, 320), (320, 384)], strict=True):
        b = bias[lo:hi].bfloat16().double()
        want = reference.linear(q8_permuted(xb, part.perm).double(), exact[lo:hi], b)
        assert rel_err(got[:, lo:hi], want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(dtype):
    rng = np.random.default_rng(11)
    w, _ = segmented(64, LAYOUTS["8-, 5- and 4-bit forms, permuted"][0], rng)
    stack, _ = qkv_stack(rng, same_perm=True)
    for weight in (w, stack):
        x = torch.randn(17, 256).to(dtype)
        batch = packed.linear(x, weight)
        for t in range(17):
            assert torch.equal(packed.linear(x[t : t + 1], weight), batch[t : t + 1])


def test_segments_with_a_dense_part_run_through_the_generic_path():
    rng = np.random.default_rng(5)
    w, exact = segmented(32, [(64, "Q4_1"), (64, "Q8_0")], rng)
    dense = InputSegments(w.perm, [w.parts[0], (64, 128, w.parts[1][2].dequantize(torch.float32))])
    assert segments.c_parts(dense) is None
    x = torch.randn(3, 128)
    assert rel_err(packed.linear(x, dense), reference.linear(x.double(), exact)) < 1e-5


# -- the fused decoder ---------------------------------------------------------------------

H, KH, D, HIDDEN, INTER = 8, 2, 32, 256, 512


def spec_model(seed: int = 0) -> tuple[LlamaForCausalLM, list]:
    """A 2-layer bf16 Llama whose projections are segments behind permutations (q|k|v a row
    stack of three with one permutation, gate|up of two with two), set directly on its
    ``DecoderLayerSpec``s; and the same layers with the weights dequantized (dense bf16)."""
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=300,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=KH,
        head_dim=D,
    )
    rng = np.random.default_rng(seed)
    model = LlamaForCausalLM(cfg, LoadOptions(torch.bfloat16))
    g = torch.Generator().manual_seed(seed)

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    model.embed_tokens.weight = bf16(300, HIDDEN)
    model.lm_head.weight = bf16(300, HIDDEN, scale=0.05)
    model.norm.weight = 1 + bf16(HIDDEN, scale=0.1)
    specs, dense = [], []
    for i in range(2):
        qkv, _ = qkv_stack(rng, same_perm=True)
        gate, _ = segmented(INTER, [(96, "Q8_0"), (160, "Q4_1")], rng)
        up, _ = segmented(INTER, [(32, "Q5_1"), (224, "Q4_0")], rng)
        o, _ = segmented(HIDDEN, [(256, "Q4_K")] if i else [(128, "Q4_1"), (128, "Q5_1")], rng)
        down, _ = segmented(HIDDEN, [(64, "Q8_0"), (448, "Q4_1")], rng)
        spec = DecoderLayerSpec(
            input_norm=1 + bf16(HIDDEN, scale=0.1),
            post_attention_norm=1 + bf16(HIDDEN, scale=0.1),
            qkv=LinearWeights(qkv, bf16((H + 2 * KH) * D, scale=0.1)),
            o=LinearWeights(o),
            gate_up=LinearWeights(RowStack([gate, up])),
            down=LinearWeights(down),
            num_heads=H,
            num_kv_heads=KH,
            head_dim=D,
            scale=D**-0.5,
            eps=cfg.rms_norm_eps,
        )
        specs.append(spec)
        unpacked = {
            n: LinearWeights(w.weight.dequantize(torch.bfloat16), w.bias)
            for n, w in (("qkv", spec.qkv), ("o", spec.o), ("gate_up", spec.gate_up), ("down", spec.down))
        }
        dense.append(dataclasses.replace(spec, **unpacked))
    model.layer_specs = specs
    return model, dense


CHUNKS = [
    [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31, 32], [40]],
    [[50, 51, 52], [55], [56]],
    [[], list(range(100, 117)), [141]],
]


def op_by_op(model, chunks):
    try:
        registry.unregister("decoder_layers", "cpu")
        return forward_chunks(model, chunks, block_size=4)
    finally:
        registry.register("decoder_layers", "cpu")(decoder.decoder_layers)


def fused(monkeypatch, model, chunks):
    def no_fallback(*args):
        raise AssertionError("the fused stack fell back to the op-by-op path")

    real = decoder.reference.decoder_layers
    monkeypatch.setattr(decoder.reference, "decoder_layers", no_fallback)
    try:
        return forward_chunks(model, chunks, block_size=4)
    finally:
        monkeypatch.setattr(decoder.reference, "decoder_layers", real)


def test_fused_stack_of_segments_matches_the_op_by_op_path_and_its_dequantized_twin(monkeypatch):
    model, dense = spec_model()
    got = fused(monkeypatch, model, CHUNKS)
    want = op_by_op(model, CHUNKS)
    for g_, w_ in zip(got, want, strict=True):
        assert torch.isfinite(w_).all() and torch.equal(g_, w_)
    # a sequence alone: the same bits as beside the others
    (alone,) = fused(monkeypatch, model, CHUNKS[1:2])
    assert torch.equal(alone, got[1])
    model.layer_specs = dense  # dense bf16 weights: torch's products of unquantized inputs
    twin = op_by_op(model, CHUNKS)
    for g_, t_ in zip(got, twin, strict=True):
        assert rel_err(g_, t_.double()) < 0.04  # int8 inputs: measured 0.020-0.022


# -- a whole model of GroupQuant weights --------------------------------------------------


class Groups:
    """A ``GroupQuant`` as a checkpoint tensor, as the GPTQ/EXL2 readers give it to a model."""

    def __init__(self, groups: GroupQuant) -> None:
        self.groups, self.shape = groups, groups.shape

    def as_groups(self) -> GroupQuant:
        return self.groups

    def to(self, device) -> "Groups":
        return Groups(self.groups.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.groups.dequantize(dtype)

    def narrow(self, dim: int, start: int, length: int) -> "Groups":
        assert (start, length) == (0, self.shape[dim]), "one rank holds the whole weight"
        return self


def round_to_groups(w: torch.Tensor, perm: torch.Tensor, rng) -> GroupQuant:
    """``w`` rounded to nearest per (row, group) with its columns stored in ``perm``'s order,
    groups of 32 or 64 stored inputs at random widths of 3 to 6 bits (min/max scale and zero)."""
    n_out, n_in = w.shape
    starts = [0]
    while starts[-1] < n_in:
        starts.append(min(n_in, starts[-1] + int(rng.choice([32, 64]))))
    bits = tuple(int(b) for b in rng.choice([3, 4, 4, 5, 6], len(starts) - 1))
    stored = w[:, perm]
    q = torch.empty(n_out, n_in, dtype=torch.uint8)
    scale, zero = torch.empty(n_out, len(bits)), torch.empty(n_out, len(bits))
    for i, (a, b) in enumerate(pairwise(starts)):
        top = 2 ** bits[i] - 1
        lo, hi = stored[:, a:b].amin(1), stored[:, a:b].amax(1)
        s = ((hi - lo) / top).clamp(min=1e-6)
        z = torch.round(-lo / s).clamp(0, top)
        q[:, a:b] = (torch.round(stored[:, a:b] / s[:, None]) + z[:, None]).clamp(0, top).to(torch.uint8)
        scale[:, i], zero[:, i] = s, z
    return GroupQuant((n_out, n_in), q, scale, zero, tuple(starts), bits, perm)


def group_quant_checkpoint(cfg: ModelConfig, seed: int) -> list:
    """HF-named tensors of a random Llama: its linears ``GroupQuant`` (``Groups``), the rest
    plain tensors. q, k and v share a permutation, as gate and up do (one Hessian each)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    hid, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    out = [
        ("model.embed_tokens.weight", torch.randn(cfg.vocab_size, hid, generator=g)),
        ("lm_head.weight", torch.randn(cfg.vocab_size, hid, generator=g) * 0.05),
        ("model.norm.weight", 1 + 0.1 * torch.randn(hid, generator=g)),
    ]
    shapes = {
        "self_attn.q_proj": (cfg.num_attention_heads * cfg.head_dim, hid),
        "self_attn.k_proj": (kv, hid),
        "self_attn.v_proj": (kv, hid),
        "self_attn.o_proj": (hid, cfg.num_attention_heads * cfg.head_dim),
        "mlp.gate_proj": (inter, hid),
        "mlp.up_proj": (inter, hid),
        "mlp.down_proj": (hid, inter),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"{p}{norm}.weight", 1 + 0.1 * torch.randn(hid, generator=g)))
        attn, mlp = (torch.from_numpy(rng.permutation(hid)) for _ in range(2))
        for name, shape in shapes.items():
            w = torch.randn(*shape, generator=g) * shape[1] ** -0.5
            perm = attn if name[-6:] in ("q_proj", "k_proj", "v_proj") else mlp
            if shape[1] != hid:
                perm = torch.from_numpy(rng.permutation(shape[1]))
            out.append((f"{p}{name}.weight", Groups(round_to_groups(w, perm, rng))))
    return out


def test_a_llama_of_group_quant_weights_runs_fused_as_op_by_op_near_its_dequantized_twin(monkeypatch):
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=300,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
    )
    tensors = group_quant_checkpoint(cfg, seed=1)
    model = LlamaForCausalLM(cfg, LoadOptions(torch.bfloat16, packed_weights=True))
    model.load_weights(iter(tensors))
    spec = model.layer_specs[0]
    assert isinstance(spec.qkv.weight, RowStack) and isinstance(spec.down.weight, InputSegments)
    assert all(isinstance(w, InputSegments) for w in spec.qkv.weight.parts)
    got = fused(monkeypatch, model, CHUNKS)
    want = op_by_op(model, CHUNKS)
    for g_, w_ in zip(got, want, strict=True):
        assert torch.isfinite(w_).all() and torch.equal(g_, w_)
    # the reference: the same integer groups dequantized to fp32, torch products, fp32 layers
    twin = LlamaForCausalLM(cfg, LoadOptions(torch.float32, packed_weights=False))
    twin.load_weights(iter(tensors))
    ref = forward_chunks(twin, CHUNKS, block_size=4)
    for g_, r_ in zip(got, ref, strict=True):
        assert rel_err(g_, r_.double()) < 0.03
