"""SamplingParams (plain data) and the batched sampler."""

from .params import SamplingParams
from .sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    draw_seed,
    exponential_race,
    filter_logits,
    make_generator,
)
from .speculative import draft_bitmasks, speculative_rows
from .structured_output import GrammarCompiler, StructuredOutput

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "SamplingRow",
    "GrammarCompiler",
    "StructuredOutput",
    "draft_bitmasks",
    "draw_seed",
    "exponential_race",
    "filter_logits",
    "make_generator",
    "speculative_rows",
]
