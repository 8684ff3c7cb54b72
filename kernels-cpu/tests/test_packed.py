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
FILE_SIZED = {"Q4_0", "Q4_1", "Q8_0"}  # repacked in exactly the file's bytes


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
@pytest.mark.parametrize("n,k", [(16, 256), (48, 512), (160, 256), (576, 1536)])
def test_packed_products_match_the_gguf_dequantizer(scheme, n, k):
    qt, exact = make(scheme, n, k, seed=n + k)
    pw = packed.prepare_linear_weight(qt, torch.float32)
    assert isinstance(pw, packed.PackedWeight)
    if scheme in FILE_SIZED:
        assert pw.nbytes == qt.data.numel()  # as small as the file's blocks
    else:  # 8-bit quants, fp16 scales per sub-block: at most 1.6x the file's 5- and 6-bit blocks
        assert pw.nbytes <= 1.64 * qt.data.numel()
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
