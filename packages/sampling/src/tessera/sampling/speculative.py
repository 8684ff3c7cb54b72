"""The sampling rows that verify a speculative draft: one per position, each the request as it
would stand had the draft tokens before it been accepted."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampler import SamplingRow


def speculative_rows(row: SamplingRow, draft: Sequence[int]) -> list[SamplingRow]:
    """The ``k + 1`` rows that verify ``draft`` (``k`` tokens) for the request ``row``.

    Row ``j`` is the request after ``draft[:j]``: its ``output_token_ids`` end with those tokens,
    so penalties and min-tokens see them and a seeded draw uses output position
    ``len(row.output_token_ids) + j``, as plain decoding would at that position. With a grammar,
    row ``j`` carries the matcher's mask after ``draft[:j]`` (see ``draft_bitmasks``) and no matcher;
    ``row.matcher`` is left where it was, for the caller to advance over the tokens it keeps
    (``matcher.consume_tokens(kept)``, up to an EOS: a stopped matcher refuses EOS).
    """
    draft, out = list(draft), row.output_token_ids
    if row.matcher is None:
        masks = [row.token_bitmask] * (len(draft) + 1)
    else:
        masks = draft_bitmasks(row.matcher, draft, row.matcher_vocab)
    # built directly: dataclasses.replace costs ten times as much, and this runs per position
    return [
        SamplingRow(
            row.params, row.generator, row.prompt_token_ids, out + draft[:j], None, row.matcher_vocab, mask
        )
        for j, mask in enumerate(masks)
    ]


def draft_bitmasks(matcher, draft: Sequence[int], vocab: int) -> torch.Tensor:
    """llguidance masks ``[k + 1, ceil(vocab / 32)]`` (int32 bits, 1 = allowed) of ``matcher`` after
    each prefix ``draft[:j]``, j = 0..k; the matcher ends in the state it started in.

    The matcher consumes the draft while the mask allows each token, then rolls back what it
    consumed. From the first token the grammar forbids (or once the matcher has stopped and only
    EOS may follow) the remaining masks repeat the last one computed: the target gives that
    token probability 0, so verification rejects it and never reads the positions after it.
    """
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    masks = allocate_token_bitmask(len(draft) + 1, vocab)
    consumed = 0
    try:
        for j in range(len(draft) + 1):
            fill_next_token_bitmask(matcher, masks, j)
            if j == len(draft) or matcher.is_stopped() or not _allowed(masks[j], draft[j], vocab):
                masks[j + 1 :] = masks[j]
                break
            if not matcher.consume_token(draft[j]):
                raise RuntimeError(
                    f"the grammar matcher refused draft token {draft[j]} that its mask allowed: "
                    f"{matcher.get_error()}"
                )
            consumed += 1
    finally:
        if consumed and not matcher.is_error() and not matcher.rollback(consumed):
            raise RuntimeError(f"the grammar matcher could not roll back {consumed} draft tokens")
    return masks


def _allowed(mask: torch.Tensor, token: int, vocab: int) -> bool:
    return 0 <= token < vocab and (int(mask[token >> 5]) >> (token & 31)) & 1 == 1
