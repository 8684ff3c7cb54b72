"""Speculative decoding: proposers of draft tokens, the policy that decides how many, and the
rejection sampler that keeps the target's output distribution."""

from .adaptive import Acceptance, AdaptivePolicy, expected_tokens
from .config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from .native import NativeBuildError
from .ngram_proposer import NgramProposer
from .proposer import Drafts, Proposer, make_proposer
from .rejection_sampler import SpeculativeOutput, rejection_sample

__all__ = [
    "MAX_SPECULATIVE_TOKENS",
    "Acceptance",
    "AdaptivePolicy",
    "Drafts",
    "NativeBuildError",
    "NgramProposer",
    "Proposer",
    "SpeculativeConfig",
    "SpeculativeOutput",
    "expected_tokens",
    "make_proposer",
    "rejection_sample",
]
