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
class MoEWeights:
    """A mixture-of-experts MLP as ``ops.fused_moe`` takes it: the router ``[E, H]`` (a tensor;
    logits in fp32, softmax, top-k), the experts as ``prepare_expert_weights`` made them."""

    router: torch.Tensor
    gate_up: object  # [E, 2I, H]
    down: object  # [E, H, I]
    top_k: int
    renormalize: bool


@dataclass(frozen=True, eq=False)
class DecoderLayerSpec:
    """A pre-norm decoder layer of the Llama kind, in this order: RMSNorm; q|k|v in one matmul;
    rotate-half rotary on q and k; K/V into the paged cache; paged attention (causal, optionally
    a sliding window); o; add the residual and RMSNorm; gate|up in one matmul; SiLU(gate) * up;
    down. ``scale`` multiplies q.k; norms are ``w * x / rms(x)`` with ``eps``. With ``moe`` set
    the MLP is that mixture of experts instead (``gate_up`` and ``down`` are None).

    With ``tp_size`` > 1 the layer is one tensor-parallel rank's part: its query and KV heads,
    its slice of the MLP's (or each expert's) intermediate size. The outputs of o and of down (or
    of the experts) are then partial sums, which ``ops.all_reduce`` adds across the ranks before
    each residual add."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: LinearWeights
    o: LinearWeights
    gate_up: LinearWeights | None
    down: LinearWeights | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    eps: float
    sliding_window: int | None = None
    moe: MoEWeights | None = None
    tp_size: int = 1

    @property
    def hidden_size(self) -> int:
        return self.o.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[1] if self.down is not None else self.moe.down.shape[2]
