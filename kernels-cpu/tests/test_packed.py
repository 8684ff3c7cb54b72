"""Products with GGUF weights kept packed, against the gguf package's own quantizer and
dequantizer followed by a float64 matmul."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize  # noqa: E402

from tessera.formats import QuantizedTensor  # noqa: E402
from tessera.kernels_cpu import native, packed  # noqa: E402

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler or no AVX512-BF16 on this CPU (weights are dequantized)"
)


def make(scheme: str, n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.1, 3.0, (n, 1))).astype(np.float32)
    raw = quantize(w, gguf.GGMLQuantizationType[scheme])
    exact = torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType[scheme]).astype(np.float64)).reshape(
        n, k
    )
    qt = QuantizedTensor(scheme, torch.from_numpy(raw.reshape(n, -1).view(np.uint8)).clone(), (n, k))
    return qt, exact


def rel_err(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("scheme", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (160, 64), (576, 1536)])
def test_packed_products_match_the_gguf_dequantizer(scheme, n, k):
    qt, exact = make(scheme, n, k, seed=n + k)
    pw = packed.prepare_linear_weight(qt, torch.float32)
    assert isinstance(pw, packed.PackedWeight)
    assert pw.nbytes == qt.data.numel()  # as small as the file's blocks
    bias = torch.randn(n)
    for m in (1, 3, 8, 13, 40, 130):
        x = torch.randn(m, k)
        ref = x.double() @ exact.T + bias.double()
        # fp32: FMAs over exact weights, error of fp32 summation only
        got = packed.linear(x, pw, bias)
        assert got.dtype == torch.float32 and rel_err(got, ref) < 1e-5
        # bf16 inputs and outputs: bf16 rounding of x and of the result
        xb = x.bfloat16()
        got = packed.linear(xb, pw, bias.bfloat16())
        ref_b = xb.double() @ exact.T + bias.bfloat16().double()
        assert got.dtype == torch.bfloat16 and rel_err(got, ref_b) < 6e-3
    # a 3-D input keeps its leading dims
    x3 = torch.randn(2, 5, k)
    assert packed.linear(x3, pw).shape == (2, 5, n)


@pytest.mark.parametrize("scheme", ["Q4_0", "Q4_1", "Q8_0"])
def test_gathered_rows_are_the_dequantized_rows(scheme):
    qt, exact = make(scheme, 64, 96, seed=7)
    pw = packed.prepare_linear_weight(qt, torch.float32)
    ids = torch.tensor([[0, 63], [17, 17]])
    rows = pw.rows(ids, torch.float32)
    assert rows.shape == (2, 2, 96)
    assert torch.equal(rows.double(), exact[ids])
    assert torch.equal(pw.dequantize(torch.float32).double(), exact)
    with pytest.raises(IndexError, match="outside 0..63"):
        pw.rows(torch.tensor([64]), torch.float32)


def test_schemes_and_shapes_the_kernels_do_not_take_are_dequantized():
    qt, exact = make("Q4_1", 40, 64)  # 40 rows: not whole groups of 16
    w = packed.prepare_linear_weight(qt, torch.float32)
    assert isinstance(w, torch.Tensor) and torch.equal(w.double(), exact)
    q6 = QuantizedTensor("Q6_K", torch.zeros(16 * 210, dtype=torch.uint8), (16, 256))
    assert isinstance(packed.prepare_linear_weight(q6, torch.bfloat16), torch.Tensor)
