"""Numba CPU kernels, registered for device "cpu" through the tessera.kernels entry point."""

import platform

import torch

from tessera.kernels import declare_backend, register

from .attention import paged_attention
from .cache_write import reshape_and_cache
from .decoder import decoder_layers
from .elementwise import fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul
from .moe import PackedExperts, fused_moe, prepare_expert_weights
from .packed import PackedWeight, linear, prepare_linear_weight

_registered = False
_C = "C kernels (AVX512-BF16/VNNI) where built, else Numba/torch"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capabilities() -> dict:
    """bf16 where the C kernels run (int8 products over packed weights: 3x fp32's decode
    speed); fp32 elsewhere, where bf16 would run through torch's slower reference ops."""
    from . import native

    lib = native.library()
    return {
        "preferred_dtype": torch.bfloat16 if lib is not None else torch.float32,
        "c_kernels": "built" if lib is not None else "unavailable (see log); Numba/torch",
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
    }


def register_all() -> None:
    global _registered
    if _registered:
        return
    declare_backend("cpu", "tessera-kernels-cpu", capabilities)
    register("paged_attention", "cpu", f"bf16: {_C}; fp32: Numba, or SDPA when not batch-invariant")(
        paged_attention
    )
    register("reshape_and_cache", "cpu", "Numba")(reshape_and_cache)
    register("rms_norm", "cpu", f"bf16: {_C}")(rms_norm)
    register("fused_add_rms_norm", "cpu", f"bf16: {_C}")(fused_add_rms_norm)
    register("rotary_embedding", "cpu", f"bf16: {_C}")(rotary_embedding)
    register("silu_and_mul", "cpu", f"bf16: {_C}")(silu_and_mul)
    register("linear", "cpu", "packed GGUF weights: C int8 (bf16) / FMA (fp32) matmul; tensors: torch")(
        linear
    )
    register("prepare_linear_weight", "cpu", "repacks Q4_0..Q6_K for the C matmul, else dequantizes")(
        prepare_linear_weight
    )
    register(
        "decoder_layers",
        "cpu",
        "whole Llama-kind layers in one C call (bf16, packed weights, bf16 cache), else op by op "
        "(reason logged once)",
    )(decoder_layers)
    register("prepare_expert_weights", "cpu", "packs each expert for the C matmul, else dequantizes")(
        prepare_expert_weights
    )
    register(
        "fused_moe", "cpu", "tokens grouped by expert, each active expert's packed weights read once (C)"
    )(fused_moe)
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
