"""The torch reference of the mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

Shapes: T tokens, H hidden size, E experts, I an expert's intermediate size, k experts per token.
Expert weights are stacked ``[E, N, K]`` like a linear weight per expert: ``gate_up`` is
``[E, 2I, H]`` (gate rows, then up rows), ``down`` is ``[E, H, I]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import reference

SCORING = ("softmax", "sigmoid")


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's k experts: (fp32 weights ``[T, k]``, expert ids ``[T, k]``), in
    ``torch.topk`` order (best first). The scores are computed in fp32 whatever the logits'
    dtype; ``renormalize`` makes a token's k weights sum to 1."""
    if scoring not in SCORING:
        raise ValueError(f"unknown MoE scoring {scoring!r} (supported: {', '.join(SCORING)})")
    n_experts = router_logits.shape[-1]
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k {top_k} is not between 1 and the number of experts ({n_experts})")
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_weight(weight, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e``'s matrix in ``dtype``, from a tensor ``[E, N, K]`` or a packed stack with
    ``expert(e)`` (or at least ``dequantize(dtype)``)."""
    if isinstance(weight, torch.Tensor):
        return weight[e].to(dtype)
    if hasattr(weight, "expert"):
        return weight.expert(e).dequantize(dtype)
    return weight.dequantize(dtype)[e]


def check_shapes(x: torch.Tensor, router_logits: torch.Tensor, gate_up, down) -> None:
    if x.dim() != 2 or router_logits.dim() != 2 or router_logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"fused_moe takes x [T, H] and router_logits [T, E], not {tuple(x.shape)} "
            f"and {tuple(router_logits.shape)}"
        )
    n_experts, hidden = router_logits.shape[1], x.shape[1]
    gu, dn = tuple(gate_up.shape), tuple(down.shape)
    inter = dn[2] if len(dn) == 3 else -1
    if gu != (n_experts, 2 * inter, hidden) or dn != (n_experts, hidden, inter):
        raise ValueError(
            f"fused_moe with {n_experts} experts and hidden size {hidden} needs gate_up [E, 2I, H] "
            f"and down [E, H, I]; got {gu} and {dn}"
        )


@reference("prepare_expert_weights")
def prepare_expert_weights(weight, dtype: torch.dtype):
    """What ``fused_moe`` will multiply with, made once at load from stacked expert matrices
    ``[E, N, K]`` (a float tensor, or a packed tensor with ``dequantize(dtype)``): here, the
    tensor in ``dtype``. Backends may keep the packed bytes in a layout of their own."""
    if len(weight.shape) != 3:
        raise ValueError(f"expert weights are [E, N, K], not {tuple(weight.shape)}")
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


@reference("fused_moe")
def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up,
    down,
    top_k: int,
    renormalize: bool,
    scoring: str = "softmax",
) -> torch.Tensor:
    """The sparse MoE MLP of x ``[T, H]``: each token goes to its ``top_k`` experts by
    ``router_logits`` ``[T, E]`` (see ``route``), expert e computes
    ``(silu(x Gate_e^T) * (x Up_e^T)) Down_e^T`` in x's dtype, and a token's output is the
    routing-weighted sum of its experts' outputs, accumulated in fp32 and returned in x's dtype.

    This is Mixtral's and Qwen3-MoE's block with ``renormalize=True``, Qwen2-MoE's (without
    its shared expert) with ``renormalize=False``. A backend may keep an expert's output in
    fp32 instead of rounding it to x's dtype before weighting it.
    """
    check_shapes(x, router_logits, gate_up, down)
    weights, ids = route(router_logits, top_k, renormalize, scoring)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[tokens], expert_weight(gate_up, e, x.dtype)).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, expert_weight(down, e, x.dtype))
        out.index_add_(0, tokens, y.float() * weights[tokens, slots, None])
    return out.to(x.dtype)
