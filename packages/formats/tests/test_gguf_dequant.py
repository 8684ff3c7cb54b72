"""Our GGUF dequantizers against the gguf package's own, bit for bit."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tessera.formats import BLOCK_LAYOUT, QuantizedTensor  # noqa: E402

# byte offsets of the float16 scale fields in each block (random bytes there could be inf/nan)
_F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
_QUANTIZED = [s for s in BLOCK_LAYOUT if s not in ("F32", "F16", "BF16")]


def synthetic_blocks(scheme: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random packed blocks whose scale fields are finite float16 values."""
    rng = np.random.default_rng(seed)
    _, size = BLOCK_LAYOUT[scheme]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in _F16_FIELDS[scheme]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("scheme", _QUANTIZED)
@pytest.mark.parametrize("n_blocks", [1, 17])
def test_synthetic_blocks_dequantize_exactly_as_gguf_does(scheme, n_blocks):
    block, _ = BLOCK_LAYOUT[scheme]
    rows = 3
    raw = synthetic_blocks(scheme, n_blocks * rows, seed=n_blocks)
    expected = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType[scheme])
    qt = QuantizedTensor(scheme, torch.from_numpy(raw.reshape(rows, -1).copy()), (rows, n_blocks * block))
    ours = qt.dequantize().numpy()
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected.astype(np.float32))


@pytest.mark.parametrize("scheme,np_dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_types_read_exactly(scheme, np_dtype):
    values = np.random.default_rng(0).standard_normal((4, 64)).astype(np_dtype)
    raw = torch.from_numpy(values.view(np.uint8).copy())
    ours = QuantizedTensor(scheme, raw, (4, 64)).dequantize().numpy()
    np.testing.assert_array_equal(ours, values.astype(np.float32))


def test_bf16_reads_exactly():
    values = torch.randn(4, 64).to(torch.bfloat16)
    raw = values.view(torch.uint8).reshape(4, -1)
    expected = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.BF16)
    np.testing.assert_array_equal(QuantizedTensor("BF16", raw, (4, 64)).dequantize().numpy(), expected)


def test_every_tensor_of_the_default_model_dequantizes_as_gguf_does(default_model_path):
    reader = gguf.GGUFReader(default_model_path)
    checked = set()
    for t in reader.tensors:
        if t.tensor_type.name in ("F32",):
            continue
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        qt = QuantizedTensor(t.tensor_type.name, torch.from_numpy(np.array(t.data)), shape)
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(qt.dequantize().numpy(), expected, err_msg=t.name)
        checked.add(t.tensor_type.name)
    assert checked == {"Q4_1", "Q8_0"}
