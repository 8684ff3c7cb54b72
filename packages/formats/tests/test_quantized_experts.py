"""3-D (expert-stacked) quantized tensors against the gguf package's own dequantizer."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tessera.formats import BLOCK_LAYOUT, QuantizedTensor  # noqa: E402

E, N, K = 3, 5, 512


def expert_blocks(scheme: str, seed: int = 0) -> np.ndarray:
    """Packed ``[E, N, bytes_per_row]`` bytes as a GGUF file stores ``ffn_*_exps``: gguf's own
    quantizer where it has one, else random K-quant blocks with sane fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[scheme]
    try:
        return gguf.quants.quantize(rng.standard_normal((E, N, K)).astype(np.float32), qtype)
    except NotImplementedError:
        _, size = BLOCK_LAYOUT[scheme]
        raw = rng.integers(0, 256, (E * N * K // 256, size), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.05, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
        if scheme == "Q6_K":
            raw[:, 208:210] = scales[:, :2]
        else:
            raw[:, 0:4] = scales  # d, dmin
        return raw.reshape(E, N, -1)


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_a_3d_tensor_dequantizes_exactly_as_gguf_does(scheme):
    raw = expert_blocks(scheme)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[scheme])
    qt = QuantizedTensor(scheme, torch.from_numpy(raw.reshape(E * N, -1).copy()), (E, N, K))
    ours = qt.dequantize()
    assert ours.shape == (E, N, K)
    np.testing.assert_array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K"])
def test_each_expert_is_a_2d_view_of_its_rows(scheme):
    raw = expert_blocks(scheme, seed=1)
    qt = QuantizedTensor(scheme, torch.from_numpy(raw.reshape(E * N, -1).copy()), (E, N, K))
    full = qt.dequantize()
    for e in range(E):
        ex = qt.expert(e)
        assert ex.shape == (N, K) and ex.scheme == scheme
        assert ex.data.data_ptr() == qt.data.data_ptr() + e * N * qt.bytes_per_row  # no copy
        assert torch.equal(ex.dequantize(), full[e])
    with pytest.raises(IndexError, match="expert 3 of a tensor with 3 experts"):
        qt.expert(E)


def test_data_in_any_shape_of_the_same_bytes_is_read_the_same():
    raw = torch.from_numpy(expert_blocks("Q4_0", seed=2).copy())
    by_rows = QuantizedTensor("Q4_0", raw.reshape(E * N, -1), (E, N, K))
    by_expert = QuantizedTensor("Q4_0", raw.reshape(E, -1), (E, N, K))  # [E, N * bytes_per_row]
    assert torch.equal(by_rows.dequantize(), by_expert.dequantize())
    assert torch.equal(by_rows.expert(2).dequantize(), by_expert.expert(2).dequantize())


def test_a_matrix_is_not_a_stack_of_experts():
    qt = QuantizedTensor("Q8_0", torch.zeros(4, 34, dtype=torch.uint8), (4, 32))
    with pytest.raises(ValueError, match="not a stack of experts"):
        qt.expert(0)
    with pytest.raises(ValueError, match="does not hold"):
        QuantizedTensor("Q8_0", torch.zeros(E * N, 34, dtype=torch.uint8), (E, N, 64))
