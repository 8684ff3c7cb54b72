"""SamplingParams (plain data) and the batched sampler."""

from .params import SamplingParams
from .sampler import Sampler, SamplerOutput, SamplingRow, filter_logits, make_generator

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingRow",
    "filter_logits",
    "make_generator",
]
