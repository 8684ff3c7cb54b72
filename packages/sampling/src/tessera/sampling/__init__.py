"""SamplingParams (plain data) and the batched sampler."""

from .params import SamplingParams
from .sampler import Sampler, SamplerOutput, SamplingRow, filter_logits, make_generator
from .structured_output import GrammarCompiler, StructuredOutput

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingRow",
    "GrammarCompiler",
    "StructuredOutput",
    "filter_logits",
    "make_generator",
]
