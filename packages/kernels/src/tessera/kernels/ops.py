"""The ops models call. Each dispatches on the device of its first tensor argument."""

from __future__ import annotations

import torch

from . import collectives as _collectives  # noqa: F401  (declares the references)
from . import moe as _moe  # noqa: F401
from . import reference as _reference  # noqa: F401
from .registry import lookup


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return lookup("rms_norm", x.device.type)(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    return lookup("fused_add_rms_norm", x.device.type)(x, residual, weight, eps)


def rotary_embedding(query, key, cos, sin, head_dim: int):
    return lookup("rotary_embedding", query.device.type)(query, key, cos, sin, head_dim)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return lookup("silu_and_mul", x.device.type)(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return lookup("gelu_tanh_and_mul", x.device.type)(x)


def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    return lookup("linear", x.device.type)(x, weight, bias, out_dtype)


def prepare_linear_weight(weight, dtype: torch.dtype):
    return lookup("prepare_linear_weight", weight.device.type)(weight, dtype)


def prepare_expert_weights(weight, dtype: torch.dtype):
    return lookup("prepare_expert_weights", weight.device.type)(weight, dtype)


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up,
    down,
    top_k: int,
    renormalize: bool,
    scoring: str = "softmax",
) -> torch.Tensor:
    return lookup("fused_moe", x.device.type)(x, router_logits, gate_up, down, top_k, renormalize, scoring)


def reshape_and_cache(key, value, kv_cache, slot_mapping, kv_scales=None) -> None:
    lookup("reshape_and_cache", key.device.type)(key, value, kv_cache, slot_mapping, kv_scales)


def paged_attention(
    query,
    kv_cache,
    query_start_loc,
    seq_lens,
    block_tables,
    scale,
    sliding_window=None,
    kv_scales=None,
    batch_invariant=True,
    max_query_len=None,
    max_seq_len=None,
):
    return lookup("paged_attention", query.device.type)(
        query,
        kv_cache,
        query_start_loc,
        seq_lens,
        block_tables,
        scale,
        sliding_window,
        kv_scales,
        batch_invariant=batch_invariant,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )


def decoder_layers(layers, x, residual, cos, sin, kv_caches, meta):
    return lookup("decoder_layers", x.device.type)(layers, x, residual, cos, sin, kv_caches, meta)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel ranks, in place (returns ``x``)."""
    return lookup("all_reduce", x.device.type)(x)


def all_gather(x: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    """The ranks' parts concatenated along ``dim``; ``sizes``: each rank's length where they differ."""
    return lookup("all_gather", x.device.type)(x, dim, sizes)
