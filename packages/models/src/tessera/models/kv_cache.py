"""The per-layer KV cache tensors: values, and scales when stored quantized."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.kernels.reference import is_quantized_kv


@dataclass
class LayerKVCache:
    data: torch.Tensor  # [2, num_blocks, block_size, Hk, D]
    scales: torch.Tensor | None = None  # [2, num_blocks, block_size, Hk] float32 for int8/fp8

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        fill: float | None = None,
    ) -> LayerKVCache:
        """``fill=None`` leaves memory uninitialized (pages map as blocks get used)."""
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        data = torch.empty(shape, dtype=dtype, device=device)
        scales = None
        if is_quantized_kv(dtype):
            scales = torch.empty(shape[:4], dtype=torch.float32, device=device)
            if fill is not None:
                scales.fill_(fill)
        elif fill is not None:
            data.fill_(fill)
        return cls(data, scales)
