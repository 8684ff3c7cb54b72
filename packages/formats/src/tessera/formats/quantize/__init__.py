"""Quantizers that write weights from calibration statistics: the GPTQ solver (one bit width,
or a width per group as EXL2 mixes them)."""

from .gptq_solver import (
    HessianFactor,
    OutputError,
    QuantResult,
    ScaleFn,
    factor_hessian,
    fp16_scales,
    gptq_quantize,
    group_sizes,
    relative_output_error,
)

__all__ = [
    "HessianFactor",
    "OutputError",
    "QuantResult",
    "ScaleFn",
    "factor_hessian",
    "fp16_scales",
    "gptq_quantize",
    "group_sizes",
    "relative_output_error",
]
