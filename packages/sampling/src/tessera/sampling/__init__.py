"""SamplingParams (plain data) and the batched sampler."""

from .params import SamplingParams
from .sampler import Sampler, filter_logits, make_generator

__all__ = ["Sampler", "SamplingParams", "filter_logits", "make_generator"]
