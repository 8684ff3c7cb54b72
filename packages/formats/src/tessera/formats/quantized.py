"""A weight kept in its packed on-disk form, with a reference dequantizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gguf_quants import BLOCK_LAYOUT, dequantize_blocks


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed rows of a 2-D (or 1-D) weight.

    ``data`` is uint8 ``[rows, bytes_per_row]``; ``shape`` is the logical torch shape
    ``(out_features, in_features)``; ``scheme`` names the block format (``"Q4_1"``, ...).
    Blocks run along the last (input) dimension, so rows can be permuted or sliced without
    unpacking them.
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
        numel = 1
        for s in self.shape:
            numel *= s
        if self.shape[-1] % block or self.data.numel() != numel // block * size:
            raise ValueError(
                f"{self.scheme} data of {self.data.numel()} bytes does not hold a tensor of "
                f"shape {tuple(self.shape)}"
            )

    @property
    def block_size(self) -> int:
        return BLOCK_LAYOUT[self.scheme][0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.scheme, self.data, self.shape).to(dtype)

    def permute_rows(self, index: torch.Tensor) -> QuantizedTensor:
        """Reorder output rows (packed rows move whole)."""
        rows = self.data.reshape(self.shape[0], -1)
        return QuantizedTensor(self.scheme, rows[index].contiguous(), self.shape)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.scheme, self.data.to(device), self.shape)
