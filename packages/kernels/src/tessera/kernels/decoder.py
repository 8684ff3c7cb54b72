"""The typed description of a decoder layer that a backend may run fused, whole layers at a
time. A model builds it once at load from the layers it owns; a backend reads this and nothing
else of the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class LinearWeights:
    """A projection as ``ops.linear`` takes it: the weight ``prepare_linear_weight`` made (a
    tensor, a backend's packed weight, a ``RowStack``) and an optional bias."""

    weight: object
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass(frozen=True, eq=False)
class DecoderLayerSpec:
    """A pre-norm decoder layer of the Llama kind, in this order: RMSNorm; q|k|v in one matmul;
    rotate-half rotary on q and k; K/V into the paged cache; paged attention (causal, optionally
    a sliding window); o; add the residual and RMSNorm; gate|up in one matmul; SiLU(gate) * up;
    down. ``scale`` multiplies q.k; norms are ``w * x / rms(x)`` with ``eps``."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: LinearWeights
    o: LinearWeights
    gate_up: LinearWeights
    down: LinearWeights
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    eps: float
    sliding_window: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.o.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[1]
