"""What the engine asks of a proposer, whatever it is (prompt lookup, a draft model)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import torch

from tessera.sampling import Sampler, SamplingRow

from .config import SpeculativeConfig


class Drafts(msgspec.Struct):
    """Per request its draft tokens (up to the k asked, fewer or none where the proposer has
    nothing better); ``probs`` the draft distributions ``[sum(k), vocab]`` they were drawn from,
    or None for a deterministic proposer (q one-hot at each token: the rejection sampler's n-gram
    and greedy draft-model case)."""

    token_ids: list[list[int]]
    probs: torch.Tensor | None = None


@dataclass
class ProposalRequest:
    """What a proposer may read of one request that has just sampled its next token."""

    request_id: str
    token_ids: Sequence[int]  # its prompt and output so far, the token just sampled last (read only)
    # its block ids in the target's full-attention KV cache group: a draft model writes its own
    # K/V at the same slots of its own tensors
    block_table: Sequence[int] = ()
    num_slots: int = 0  # positions 0 .. num_slots - 1 have a slot in those blocks
    row: SamplingRow | None = None  # its sampling state (for the logits processors)


class Proposer(Protocol):
    # seconds of one batched forward per drafted position (a moving average; 0 for a proposer
    # that runs no model): the runner weighs a drafted token's cost with it
    forward_seconds: float

    def draft(self, requests: Sequence[ProposalRequest], ks: Sequence[int]) -> Drafts:
        """Draft up to ``ks[i]`` tokens to follow ``requests[i].token_ids``; ``ks[i] == 0`` asks
        nothing of request ``i``."""
        ...

    def catch_up_tokens(self, request: ProposalRequest) -> int:
        """Context tokens this proposer would have to run for ``request`` before drafting,
        beyond the one a drafting step always takes (0 for a proposer that keeps no state): a
        draft model that has not drafted for a request for a while must first read what the
        target accepted meanwhile. The policy counts this cost."""
        ...

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget what is kept for these requests (finished, aborted or preempted: a preempted
        request comes back as a new one, its blocks perhaps different)."""
        ...

    def measure(self, block_table: Sequence[int], num_slots: int, repeats: int) -> None:
        """Set ``forward_seconds`` from timed forwards before any request runs (a proposer with
        no model has nothing to time); K/V may be written at the slots of ``block_table``."""
        ...


def make_proposer(
    config: SpeculativeConfig,
    draft_model=None,
    *,
    eos_token_ids: Sequence[int] = (),
    max_catch_up: int = 2048,
) -> Proposer:
    """The proposer that ``config`` names (the n-gram one builds its C library here, so a machine
    without a compiler fails at start). For method "draft_model": ``draft_model`` is the draft as
    a :class:`~tessera.spec_decode.DraftModel` (the engine loads it and owns its K/V tensors),
    ``eos_token_ids`` end a draft, ``max_catch_up`` bounds the context one call forwards."""
    from .draft_model import DraftModelProposer
    from .ngram_proposer import NgramProposer

    if config.method == "ngram":
        return NgramProposer(
            config.prompt_lookup_min, config.prompt_lookup_max, config.num_speculative_tokens
        )
    if config.method == "draft_model":
        if draft_model is None:
            raise ValueError('speculative method "draft_model" needs the loaded draft model')
        return DraftModelProposer(draft_model, Sampler(tuple(eos_token_ids)), max_catch_up)
    raise ValueError(f"speculative method {config.method!r} has no proposer in this build")
