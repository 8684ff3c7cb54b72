"""Products with GGUF weights kept packed, against the gguf package's own quantizer and
dequantizer followed by a float64 matmul."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402

from tessera.formats import QuantizedTensor  # noqa: E402
from tessera.kernels import RowStack  # noqa: E402
from tessera.kernels_cpu import native, packed  # noqa: E402

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler or no AVX512-BF16 on this CPU (weights are dequantized)"
)


K_QUANTS = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # bytes per 256-input block


def k_quant_blocks(scheme: str, n: int, k: int, rng) -> np.ndarray:
    """Random K-quant blocks (gguf can dequantize them but not quantize): random quant and
    scale bytes, with the fp16 super-block scales set to sane values."""
    size = K_QUANTS[scheme]
    raw = rng.integers(0, 256, (n * k // 256, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    if scheme == "Q6_K":
        raw[:, 208:210] = scales[:, :2]
    else:
        raw[:, 0:4] = scales  # d, dmin
    return raw.reshape(n, -1)


def make(scheme: str, n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.1, 3.0, (n, 1))).astype(np.float32)
    if scheme in K_QUANTS:
        raw = k_quant_blocks(scheme, n, k, rng)
    else:
        raw = quantize(w, gguf.GGMLQuantizationType[scheme])
    exact = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType[scheme]).astype(np.float64)).reshape(
        n, k
    )
    qt = QuantizedTensor(scheme, torch.from_numpy(raw.reshape(n, -1).view(np.uint8)).clone(), (n, k))
    return qt, exact


def rel_err(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


def q8_inputs(x: torch.Tensor) -> torch.Tensor:
    """x quantized per 32 inputs to int8 with scale max|x| / 127, rounded to nearest even, in
    fp32 (the documented activation quantization of the bf16 path), dequantized."""
    b = x.float().reshape(x.shape[0], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    # a true fp32 division (torch computes `127.0 / t` as 127 * (1 / t), one more rounding)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(b * inv).clamp(-128, 127) * (amax / 127.0)).reshape(x.shape)


ALL_SCHEMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
FILE_SIZED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}  # repacked in exactly the file's bytes
BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
@pytest.mark.parametrize("n,k", [(16, 256), (48, 512), (160, 256), (576, 1536)])
def test_packed_products_match_the_gguf_dequantizer(scheme, n, k):
    qt, exact = make(scheme, n, k, seed=n + k)
    pw = packed.prepare_linear_weight(qt, torch.float32)
    assert isinstance(pw, packed.PackedWeight)
    assert pw.qs.numel() * 8 == n * k * BITS[scheme]  # the file's bits a quant, no more
    if scheme in FILE_SIZED:
        assert pw.nbytes == qt.data.numel()  # as small as the file's blocks
    else:  # two fp16 scales per 32 (d and m; Q6_K: a d per 16): 5, 6 and 7 bits a weight for the
        # files' 4.5, 5.5 and 6.56
        assert pw.nbytes * 8 == n * k * (BITS[scheme] + 1)
    # K-quant sub-block scales are rounded to fp16 (relative 2^-12); the others are exact
    w_tol = 1e-5 if scheme not in K_QUANTS else 1e-3
    bias = torch.randn(n)
    for m in (1, 3, 8, 13, 40, 130):
        x = torch.randn(m, k)
        ref = x.double() @ exact.T + bias.double()
        # fp32: FMAs over exact weights, error of fp32 summation only
        got = packed.linear(x, pw, bias)
        assert got.dtype == torch.float32 and rel_err(got, ref) < w_tol
        # bf16 inputs and outputs, any number of tokens: inputs quantized to int8 per 32,
        # result rounded to bf16
        xb = x.bfloat16()
        got = packed.linear(xb, pw, bias.bfloat16())
        ref_q = q8_inputs(xb).double() @ exact.T + bias.bfloat16().double()
        assert got.dtype == torch.bfloat16 and rel_err(got, ref_q) < 4e-3 + w_tol
        # fp32 out (logits): the same sums, not rounded to bf16
        got32 = packed.linear(xb, pw, bias.bfloat16(), torch.float32)
        assert got32.dtype == torch.float32 and rel_err(got32, ref_q) < 1e-5 + w_tol
        # and the int8 inputs cost about what llama.cpp's q8 activations cost
        ref_b = xb.double() @ exact.T + bias.bfloat16().double()
        assert rel_err(got, ref_b) < 1.5e-2
    # a 3-D input keeps its leading dims
    x3 = torch.randn(2, 5, k)
    assert packed.linear(x3, pw).shape == (2, 5, n)


LEGACY_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}  # per 32-block


def exact_blocks(scheme: str, n: int, k: int, rng) -> np.ndarray:
    """Random blocks whose scales are small multiples of 2^-12 (d, m, the K-quants' super-block
    scales, sub-block scales and mins at most 7): every weight is an integer times 2^-12."""
    u = np.float16(2.0**-12)
    if scheme in K_QUANTS:
        raw = rng.integers(0, 256, (n * k // 256, K_QUANTS[scheme]), dtype=np.uint8)
        if scheme == "Q6_K":
            raw[:, 192:208] = rng.integers(-7, 8, (raw.shape[0], 16)).astype(np.int8).view(np.uint8)
            raw[:, 208:210] = np.full((raw.shape[0], 1), u).view(np.uint8)
        else:
            raw[:, 0:4] = np.full((raw.shape[0], 2), u).view(np.uint8)  # d, dmin
            raw[:, 4:12] &= 0x07  # sub-blocks 0-3: scale and min; no high bits for 4-7
            raw[:, 12:16] &= 0x77  # sub-blocks 4-7: scale, min
        return raw.reshape(n, -1)
    raw = rng.integers(0, 256, (n * k // 32, LEGACY_BYTES[scheme]), dtype=np.uint8)
    d = (u * rng.integers(1, 3, (raw.shape[0], 1))).astype(np.float16)
    raw[:, 0:2] = d.view(np.uint8)
    if scheme in ("Q4_1", "Q5_1"):
        raw[:, 2:4] = (-u * rng.integers(0, 17, (raw.shape[0], 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_products_are_bitwise_the_gguf_dequantizers_times_x(scheme, dtype):
    """Weights that are integers times 2^-12 and inputs that are integers times 2^-6 with a
    32-block's largest at 127 (so the int8 quantization of bf16 inputs is exact): every product
    and partial sum is an fp32 integer multiple of 2^-18 below 2^24 of them, so any summation
    order gives the exact product, which each quant bit changes. The kernels' outputs must be
    bitwise gguf's dequantized weight times x in float64, for the int8 (bf16 x) and FMA (fp32 x)
    paths, 1 to 13 tokens, K-quants over two 256-blocks."""
    n, k = 48, 512
    rng = np.random.default_rng(BITS[scheme] * 100 + int(dtype == torch.float32))
    raw = exact_blocks(scheme, n, k, rng)
    exact = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType[scheme]).astype(np.float64)).reshape(
        n, k
    )
    pw = packed.prepare_linear_weight(QuantizedTensor(scheme, torch.from_numpy(raw).clone(), (n, k)), dtype)
    assert isinstance(pw, packed.PackedWeight)
    bias = torch.from_numpy(rng.integers(-255, 256, n) * 2.0**-10).to(dtype)
    for m in (1, 5, 8, 13):
        q = rng.integers(-31, 32, (m, k // 32, 32))
        q[np.arange(m)[:, None], np.arange(k // 32), rng.integers(0, 32, (m, k // 32))] = 127
        q *= rng.choice([-1, 1], q.shape)
        x = torch.from_numpy(q.reshape(m, k) * 2.0**-6)
        # the premise: sum |w x| leaves room below 2^24 units of 2^-18 for a block's partial sum
        assert (x.abs() @ exact.abs().T).max() < 2.0**23 * 2.0**-18
        ref = x @ exact.T + bias.double()
        assert torch.equal(ref.float().double(), ref)
        xd = x.to(dtype)
        got = packed.linear(xd, pw, bias, torch.float32)
        assert torch.equal(got, ref.float()), (m, (got.double() - ref).abs().max().item())
        if dtype == torch.bfloat16:  # bf16 out: the exact sums rounded once
            assert torch.equal(packed.linear(xd, pw, bias), ref.float().bfloat16())


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_gathered_rows_are_the_dequantized_rows(scheme):
    qt, exact = make(scheme, 64, 256, seed=7)
    pw = packed.prepare_linear_weight(qt, torch.float32)
    ids = torch.tensor([[0, 63], [17, 17]])
    rows = pw.rows(ids, torch.float32)
    assert rows.shape == (2, 2, 256)
    full = pw.dequantize(torch.float32).double()
    if scheme in K_QUANTS:  # fp16 sub-block scales: d * scale and dmin * min each within 2^-12
        assert rel_err(rows, exact[ids]) < 1e-3
        assert rel_err(full, exact) < 1e-3
    else:
        assert torch.equal(rows.double(), exact[ids])
        assert torch.equal(full, exact)
    assert torch.equal(rows, full[ids].float())
    with pytest.raises(IndexError, match="outside 0..63"):
        pw.rows(torch.tensor([64]), torch.float32)


def test_schemes_and_shapes_the_kernels_do_not_take_are_dequantized():
    qt, exact = make("Q4_1", 40, 64)  # 40 rows: not whole groups of 16
    w = packed.prepare_linear_weight(qt, torch.float32)
    assert isinstance(w, torch.Tensor) and torch.equal(w.double(), exact)
    q3 = QuantizedTensor("Q3_K", torch.zeros(16 * 110, dtype=torch.uint8), (16, 256))
    assert isinstance(packed.prepare_linear_weight(q3, torch.bfloat16), torch.Tensor)


def test_a_row_stack_of_schemes_multiplies_as_its_parts_side_by_side():
    parts = [make("Q4_K", 64, 256, seed=1), make("Q4_K", 32, 256, seed=2), make("Q6_K", 32, 256, seed=3)]
    stack = RowStack([packed.prepare_linear_weight(qt, torch.bfloat16) for qt, _ in parts])
    assert stack.shape == (128, 256)
    exact = torch.cat([e for _, e in parts])
    assert rel_err(stack.dequantize(torch.float32), exact) < 1e-3
    x, bias = torch.randn(5, 256), torch.randn(128)
    got = packed.linear(x, stack, bias)
    assert got.shape == (5, 128) and rel_err(got, x.double() @ exact.T + bias.double()) < 1e-3
    xb = x.bfloat16()
    got = packed.linear(xb, stack, bias.bfloat16())
    assert rel_err(got, q8_inputs(xb).double() @ exact.T + bias.bfloat16().double()) < 5e-3
