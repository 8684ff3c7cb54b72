"""Quantizers that write weights from calibration statistics: the GPTQ solver (one bit width,
or a width per group as EXL2 mixes them)."""

from .gptq_solver import QuantResult, ScaleFn, fp16_scales, gptq_quantize, group_sizes, relative_output_error

__all__ = ["QuantResult", "ScaleFn", "fp16_scales", "gptq_quantize", "group_sizes", "relative_output_error"]
