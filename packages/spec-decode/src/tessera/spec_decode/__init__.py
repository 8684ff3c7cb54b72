"""Speculative decoding: proposers of draft tokens and the rejection sampler that keeps the
target's output distribution."""

from .native import NativeBuildError
from .ngram_proposer import NgramProposer
from .rejection_sampler import SpeculativeOutput, rejection_sample

__all__ = ["NativeBuildError", "NgramProposer", "SpeculativeOutput", "rejection_sample"]
