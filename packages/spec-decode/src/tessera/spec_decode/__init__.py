"""Speculative decoding: proposers of draft tokens, the policy that decides how many, and the
rejection sampler that keeps the target's output distribution."""

from .adaptive import Acceptance, AdaptivePolicy, StepTimes, expected_tokens
from .config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from .draft_model import DraftModel, DraftModelProposer
from .native import NativeBuildError
from .ngram_proposer import NgramProposer
from .proposer import Drafts, ProposalRequest, Proposer, make_proposer
from .rejection_sampler import SpeculativeOutput, rejection_sample

__all__ = [
    "MAX_SPECULATIVE_TOKENS",
    "Acceptance",
    "AdaptivePolicy",
    "DraftModel",
    "DraftModelProposer",
    "Drafts",
    "NativeBuildError",
    "NgramProposer",
    "ProposalRequest",
    "Proposer",
    "SpeculativeConfig",
    "SpeculativeOutput",
    "StepTimes",
    "expected_tokens",
    "make_proposer",
    "rejection_sample",
]
