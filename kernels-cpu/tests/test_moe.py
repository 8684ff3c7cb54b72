"""The packed CPU fused_moe against the torch reference (tessera.kernels.moe) on GGUF experts made
by the gguf package's own quantizer, and a token's output bits against the batch around it.

Tolerances (relative error of the whole output):
- fp32 x: the reference's math over the packed weights, up to fp32 summation order and the
  kernel's polynomial exp in silu: < 1e-5.
- bf16 x: both products take int8 inputs quantized per 32 (tests/test_packed.py); against a
  float64 emulation of exactly that (with the bf16 roundings of the reference) < 5e-3; against
  the bf16 reference over the same weights < 3e-2 (two int8-input products, about what
  llama.cpp's q8 activations cost).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from tessera.formats import QuantizedTensor  # noqa: E402
from tessera.kernels import lookup, ops  # noqa: E402
from tessera.kernels import moe as reference  # noqa: E402
from tessera.kernels_cpu import moe, native  # noqa: E402

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler or no AVX512-BF16 on this CPU (weights are dequantized)"
)

H, INTER = 256, 256  # multiples of 256: the K-quants' blocks run along both products' inputs


def q8_inputs(x: torch.Tensor) -> torch.Tensor:
    """x quantized per 32 inputs to int8 (scale max|x| / 127, round to nearest even, in fp32),
    dequantized: the bf16 path's activations (as in test_packed.py)."""
    b = x.float().reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(b * inv).clamp(-128, 127) * (amax / 127.0)).reshape(x.shape)


def q4_k_blocks(e: int, n: int, k: int, rng) -> np.ndarray:
    """Random Q4_K blocks (gguf cannot quantize to Q4_K) with fp16 d, dmin near 0.001."""
    raw = rng.integers(0, 256, (e * n * k // 256, 144), dtype=np.uint8)
    raw[:, 0:4] = rng.uniform(5e-4, 2e-3, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    return raw


def quantized_experts(scheme: str, e: int, n: int, k: int, seed: int) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    if scheme == "Q4_K":
        raw = q4_k_blocks(e, n, k, rng)
    else:
        w = (rng.standard_normal((e, n, k)) * 0.05).astype(np.float32)
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[scheme])
    return QuantizedTensor(scheme, torch.from_numpy(raw.reshape(e * n, -1).copy()), (e, n, k))


def prepared(scheme: str, e: int, seed: int = 0, dtype=torch.bfloat16):
    gate_up = moe.prepare_expert_weights(quantized_experts(scheme, e, 2 * INTER, H, seed), dtype)
    down = moe.prepare_expert_weights(quantized_experts(scheme, e, H, INTER, seed + 1), dtype)
    assert isinstance(gate_up, moe.PackedExperts) and isinstance(down, moe.PackedExperts)
    return gate_up, down


def rel_err(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def emulate_int8(x, logits, gate_up, down, top_k, renormalize, scoring):
    """The bf16 kernel's documented math in float64: int8 inputs of both products, gate_up and
    silu * up rounded to bf16 as the reference does, the expert outputs kept in full precision."""
    weights, ids = reference.route(logits, top_k, renormalize, scoring)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in ids.unique().tolist():
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        w_gu, w_dn = gate_up.expert(e).dequantize().double(), down.expert(e).dequantize().double()
        gate, up = (q8_inputs(x[tokens]).double() @ w_gu.T).bfloat16().chunk(2, dim=-1)
        act = F.silu(gate.double()).bfloat16() * up
        y = q8_inputs(act).double() @ w_dn.T
        out.index_add_(0, tokens, y * weights[tokens, slots, None].double())
    return out


def check(x, logits, gate_up, down, top_k, renormalize=True, scoring="softmax"):
    got = moe.fused_moe(x, logits, gate_up, down, top_k, renormalize, scoring)
    assert got.dtype == x.dtype and got.shape == x.shape
    expected = reference.fused_moe(x, logits, gate_up, down, top_k, renormalize, scoring)
    if x.dtype == torch.float32:
        assert rel_err(got, expected) < 1e-5
    else:
        assert rel_err(got, emulate_int8(x, logits, gate_up, down, top_k, renormalize, scoring)) < 5e-3
        assert rel_err(got, expected) < 3e-2
    return got


@pytest.mark.parametrize("scheme", ["Q4_0", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 17, 33])
def test_packed_experts_match_the_reference(scheme, dtype, tokens):
    gate_up, down = prepared(scheme, 8, seed=tokens)
    x, logits = torch.randn(tokens, H).to(dtype), torch.randn(tokens, 8).to(dtype)
    check(x, logits, gate_up, down, top_k=2)


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_every_routing_variant_matches_the_reference(top_k, renormalize, scoring):
    gate_up, down = prepared("Q8_0", 16, seed=top_k)
    x, logits = torch.randn(17, H), torch.randn(17, 16)
    check(x, logits, gate_up, down, top_k, renormalize, scoring)
    check(x.bfloat16(), logits.bfloat16(), gate_up, down, top_k, renormalize, scoring)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_token_routed_to_one_expert_and_most_experts_idle(dtype):
    gate_up, down = prepared("Q4_0", 32, seed=5)
    x, logits = torch.randn(33, H).to(dtype), torch.randn(33, 32)
    logits[:, 3] += 30.0  # expert 3 first for everyone, the 31 others share the second slots
    check(x, logits, gate_up, down, top_k=1)
    check(x, logits, gate_up, down, top_k=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tokens_output_bits_do_not_depend_on_the_batch(dtype):
    gate_up, down = prepared("Q4_K", 64, seed=9)
    x, logits = torch.randn(33, H).to(dtype), torch.randn(33, 64)
    batch = moe.fused_moe(x, logits, gate_up, down, 8, True)
    for t in (0, 16, 32):
        alone = moe.fused_moe(x[t : t + 1], logits[t : t + 1], gate_up, down, 8, True)
        assert torch.equal(alone[0], batch[t])
    assert torch.equal(moe.fused_moe(x[5:22], logits[5:22], gate_up, down, 8, True), batch[5:22])


def test_the_thread_count_does_not_change_a_bit():
    """Many tokens split the experts among the threads, few split each product: same bits."""
    gate_up, down = prepared("Q8_0", 64, seed=11)
    x, logits = torch.randn(33, H).bfloat16(), torch.randn(33, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = moe.fused_moe(x, logits, gate_up, down, 8, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(moe.fused_moe(x, logits, gate_up, down, 8, True), one)


def test_what_the_kernel_does_not_take_runs_the_reference():
    gate_up, down = prepared("Q8_0", 4, seed=3)
    x, logits = torch.randn(5, H).half(), torch.randn(5, 4)
    expected = reference.fused_moe(x, logits, gate_up, down, 2, True)
    assert torch.equal(moe.fused_moe(x, logits, gate_up, down, 2, True), expected)
    float_down = moe.prepare_expert_weights(torch.randn(4, H, INTER), torch.float32)
    assert isinstance(float_down, torch.Tensor)
    x, logits = torch.randn(5, H), torch.randn(5, 4)
    expected = reference.fused_moe(x, logits, gate_up, float_down, 2, True)
    assert torch.equal(moe.fused_moe(x, logits, gate_up, float_down, 2, True), expected)
    q3 = QuantizedTensor("Q3_K", torch.zeros(4 * 16 * 110, dtype=torch.uint8), (4, 16, 256))
    assert isinstance(moe.prepare_expert_weights(q3, torch.bfloat16), torch.Tensor)


def test_the_ops_dispatch_to_the_packed_kernel_on_cpu():
    assert lookup("fused_moe", "cpu") is moe.fused_moe
    assert lookup("prepare_expert_weights", "cpu") is moe.prepare_expert_weights
    qt = quantized_experts("Q8_0", 4, H, INTER, seed=2)
    packed = ops.prepare_expert_weights(qt, torch.bfloat16)
    assert isinstance(packed, moe.PackedExperts) and packed.shape == (4, H, INTER)
    assert packed.nbytes == qt.data.numel()  # Q8_0 repacks into the file's size
    assert torch.equal(packed.dequantize(), qt.dequantize())
    empty = ops.fused_moe(torch.zeros(0, H), torch.zeros(0, 4), prepared("Q8_0", 4)[0], packed, 2, True)
    assert empty.shape == (0, H)
