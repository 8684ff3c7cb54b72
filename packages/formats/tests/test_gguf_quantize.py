"""Our GGUF quantizers against the ``gguf`` package's (which follow ggml's reference code):
the same bytes, and our dequantizer reads them back within a block's step."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from tessera.formats import FormatError
from tessera.formats.gguf_quantize import QUANTIZABLE, quantize_gguf


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[1, :32] = 0.25  # a constant block
    w[2, 32:64] = torch.linspace(-1, 1, 32)  # ties in magnitude: the first wins
    w[3, 64:96] *= 1e4  # a large block
    w[4] = torch.arange(256) / 127.0 * 0.5  # values at exact halves of a Q8_0 step
    return w


@pytest.mark.parametrize("scheme", QUANTIZABLE)
@pytest.mark.parametrize("seed", [0, 1])
def test_bytes_equal_gguf_package(scheme, seed):
    w = _weights(seed)
    ours = quantize_gguf(w, scheme, rows_per_chunk=7)  # chunks that do not divide the rows
    theirs = quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, scheme))
    assert ours.shape == tuple(w.shape)
    np.testing.assert_array_equal(ours.data.numpy(), theirs)
    back = ours.dequantize()
    ref = torch.from_numpy(quants.dequantize(theirs, getattr(gguf.GGMLQuantizationType, scheme)))
    torch.testing.assert_close(back, ref, rtol=0, atol=0)


def test_bad_input_is_refused():
    with pytest.raises(FormatError, match="Q4_K"):
        quantize_gguf(torch.zeros(4, 256), "Q4_K")
    with pytest.raises(FormatError, match="multiple of 32 inputs; the weight has 48"):
        quantize_gguf(torch.zeros(4, 48), "Q4_0")
    with pytest.raises(FormatError, match="matrix"):
        quantize_gguf(torch.zeros(4, 2, 32), "Q8_0")
    w = torch.zeros(4, 32)
    w[2, 3] = float("nan")
    with pytest.raises(FormatError, match="non-finite"):
        quantize_gguf(w, "Q8_0")
