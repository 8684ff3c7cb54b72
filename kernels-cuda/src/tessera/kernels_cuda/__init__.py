"""CUDA kernels for tessera, registered for device "cuda" through the tessera.kernels entry point.

Triton kernels (attention over the paged cache, packed GGUF matmuls, fused MoE) and CUDA C++
ones (csrc/, built with nvcc into a C-ABI library at first use and loaded with cffi). Nothing is
imported or compiled until an op first runs on a CUDA tensor, so installing this package costs a
CPU-only process nothing. Under ROCm (``torch.version.hip`` set) tessera-kernels-rocm registers
the same kernels instead.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from tessera.kernels import declare_backend, register

_registered = False

# op -> (module of this package, function, what `tessera info` says about it)
OPS: dict[str, tuple[str, str, str]] = {
    "paged_attention": (
        "attention",
        "paged_attention",
        "Triton: varlen flash attention over the block table (prefill), split-K decode",
    ),
    "reshape_and_cache": ("attention", "reshape_and_cache", "Triton: one pass, int8/fp8 quantized in it"),
    "rms_norm": ("elementwise", "rms_norm", "CUDA C++ (nvcc at first use)"),
    "fused_add_rms_norm": ("elementwise", "fused_add_rms_norm", "CUDA C++ (nvcc at first use)"),
    "rotary_embedding": ("elementwise", "rotary_embedding", "CUDA C++ (nvcc at first use)"),
    "silu_and_mul": ("elementwise", "silu_and_mul", "CUDA C++ (nvcc at first use)"),
    "gelu_tanh_and_mul": ("elementwise", "gelu_tanh_and_mul", "CUDA C++ (nvcc at first use)"),
    "prepare_linear_weight": (
        "quant_linear",
        "prepare_linear_weight",
        "repacks Q4_0..Q6_K once at load for the Triton matmuls, else dequantizes",
    ),
    "linear": (
        "quant_linear",
        "linear",
        "packed GGUF: Triton GEMV (few tokens) or dequantize + cuBLAS (many); tensors: torch",
    ),
    "prepare_expert_weights": ("moe", "prepare_expert_weights", "packs each expert for the Triton kernels"),
    "fused_moe": ("moe", "fused_moe", "Triton: tokens sorted by expert, grouped GEMM over packed experts"),
}


def lazy(module: str, name: str):
    """The function ``name`` of ``module``, imported at its first call."""
    target = None

    def call(*args, **kwargs):
        nonlocal target
        if target is None:
            target = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return target(*args, **kwargs)

    call.__name__ = name
    call.__qualname__ = name
    call.__module__ = f"{__name__}.{module}"
    return call


def capabilities() -> dict:
    caps: dict = {"preferred_dtype": torch.bfloat16}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        caps["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"
        if not torch.cuda.is_bf16_supported():
            caps["preferred_dtype"] = torch.float16
    try:
        import triton

        caps["triton"] = triton.__version__
    except ImportError:
        caps["triton"] = "not installed"
    return caps


def register_all() -> None:
    global _registered
    if _registered or torch.version.hip is not None:  # ROCm: tessera-kernels-rocm registers
        return
    _registered = True
    declare_backend("cuda", "tessera-kernels-cuda", capabilities)
    for op, (module, name, note) in OPS.items():
        if importlib.util.find_spec(f"{__name__}.{module}") is not None:  # found, not imported
            register(op, "cuda", note)(lazy(module, name))


__all__ = ["OPS", "capabilities", "lazy", "register_all"]
