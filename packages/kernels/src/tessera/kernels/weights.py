"""Weight containers that every backend's ``linear`` understands."""

from __future__ import annotations

import torch


class RowStack:
    """Weights stacked by output rows that cannot be one tensor: projections fused into one
    matmul (q|k|v, gate|up) whose checkpoint tensors use different quantization schemes (a
    GGUF Q4_K_M file keeps some v projections in Q6_K and the q and k ones in Q4_K). Each part
    is what the backend's ``prepare_linear_weight`` made of it; the product is the parts'
    products side by side."""

    def __init__(self, parts: list) -> None:
        if not parts or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("a row stack needs parts with the same number of inputs")
        self.parts = list(parts)
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat(
            [p.to(dtype) if isinstance(p, torch.Tensor) else p.dequantize(dtype) for p in self.parts]
        )
