"""Numba CPU kernels, registered for device "cpu" through the tessera.kernels entry point."""

from tessera.kernels import register

from .attention import paged_attention
from .cache_write import reshape_and_cache
from .decoder import decoder_layers
from .elementwise import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul
from .moe import PackedExperts, fused_moe, prepare_expert_weights
from .packed import PackedWeight, linear, prepare_linear_weight

_registered = False


def register_all() -> None:
    global _registered
    if _registered:
        return
    register("paged_attention", "cpu")(paged_attention)
    register("reshape_and_cache", "cpu")(reshape_and_cache)
    register("rms_norm", "cpu")(rms_norm)
    register("fused_add_rms_norm", "cpu")(fused_add_rms_norm)
    register("rotary_embedding", "cpu")(rotary_embedding)
    register("silu_and_mul", "cpu")(silu_and_mul)
    register("linear", "cpu")(linear)
    register("prepare_linear_weight", "cpu")(prepare_linear_weight)
    register("decoder_layers", "cpu")(decoder_layers)
    register("prepare_expert_weights", "cpu")(prepare_expert_weights)
    register("fused_moe", "cpu")(fused_moe)
    _registered = True


__all__ = [
    "PackedExperts",
    "PackedWeight",
    "decoder_layers",
    "linear",
    "prepare_linear_weight",
    "fused_add_rms_norm",
    "fused_moe",
    "paged_attention",
    "prepare_expert_weights",
    "register_all",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
]
