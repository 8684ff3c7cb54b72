"""A weight kept in its packed on-disk form, with a reference dequantizer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .gguf_quants import BLOCK_LAYOUT, dequantize_blocks


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed rows of a 1-D, 2-D or 3-D weight.

    ``shape`` is the logical torch shape: ``(out_features, in_features)`` for a matrix,
    ``(experts, out_features, in_features)`` for the stacked expert matrices of a MoE layer
    (GGUF's ``ffn_gate_exps`` and friends: E consecutive matrices). ``scheme`` names the block
    format (``"Q4_1"``, ...). Blocks run along the last (input) dimension, so rows can be
    permuted, sliced or split by expert without unpacking them.

    ``data`` is uint8 ``[rows, bytes_per_row]`` with ``rows`` the product of all dims but the
    last (``E * N`` for experts: expert e owns rows ``e*N .. (e+1)*N - 1``); any other shape
    holding the same contiguous bytes is accepted and read as that.
    """

    scheme: str
    data: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.scheme not in BLOCK_LAYOUT:
            raise ValueError(
                f"unknown quantization scheme {self.scheme!r} (supported: {', '.join(BLOCK_LAYOUT)})"
            )
        block, size = BLOCK_LAYOUT[self.scheme]
        if self.shape[-1] % block or self.data.numel() != math.prod(self.shape) // block * size:
            raise ValueError(
                f"{self.scheme} data of {self.data.numel()} bytes does not hold a tensor of "
                f"shape {tuple(self.shape)}"
            )

    @property
    def block_size(self) -> int:
        return BLOCK_LAYOUT[self.scheme][0]

    @property
    def bytes_per_row(self) -> int:
        block, size = BLOCK_LAYOUT[self.scheme]
        return self.shape[-1] // block * size

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def num_experts(self) -> int:
        if len(self.shape) != 3:
            raise ValueError(f"a {self.scheme} tensor of shape {tuple(self.shape)} is not a stack of experts")
        return self.shape[0]

    def rows(self) -> torch.Tensor:
        """``data`` as ``[rows, bytes_per_row]`` (a view where ``data`` is contiguous)."""
        return self.data.reshape(-1, self.bytes_per_row)

    def expert(self, e: int) -> QuantizedTensor:
        """Expert ``e`` of a 3-D tensor as a 2-D one whose data is a view of this one's."""
        n_experts, n = self.num_experts, self.shape[1]
        if not 0 <= e < n_experts:
            raise IndexError(f"expert {e} of a tensor with {n_experts} experts")
        return QuantizedTensor(self.scheme, self.rows()[e * n : (e + 1) * n], self.shape[1:])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.scheme, self.data, self.shape).to(dtype)

    def permute_rows(self, index: torch.Tensor) -> QuantizedTensor:
        """Reorder the output rows of a matrix (packed rows move whole)."""
        if len(self.shape) != 2:
            raise ValueError(f"permute_rows takes a matrix, not a tensor of shape {tuple(self.shape)}")
        return QuantizedTensor(self.scheme, self.rows()[index].contiguous(), self.shape)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.scheme, self.data.to(device), self.shape)
