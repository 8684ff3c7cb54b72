"""What the engine asks of a proposer, whatever it is (prompt lookup, a draft model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec
import torch

from .config import SpeculativeConfig


class Drafts(msgspec.Struct):
    """Per request its draft tokens (up to the k asked, fewer or none where the proposer has
    nothing better); ``probs`` the draft distributions ``[sum(k), vocab]`` they were drawn from,
    or None for a deterministic proposer (q one-hot at each token: the rejection sampler's n-gram
    case)."""

    token_ids: list[list[int]]
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def draft(self, contexts: Sequence[Sequence[int]], ks: Sequence[int]) -> Drafts:
        """Draft up to ``ks[i]`` tokens to follow ``contexts[i]`` (a request's prompt and output so
        far); ``ks[i] == 0`` asks nothing of request ``i``."""
        ...


def make_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer that ``config`` names (the n-gram one builds its C library here, so a machine
    without a compiler fails at start)."""
    from .ngram_proposer import NgramProposer

    if config.method == "ngram":
        return NgramProposer(
            config.prompt_lookup_min, config.prompt_lookup_max, config.num_speculative_tokens
        )
    raise ValueError(f"speculative method {config.method!r} has no proposer in this build")
