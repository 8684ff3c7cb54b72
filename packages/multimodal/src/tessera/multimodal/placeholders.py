"""Placeholder expansion: the chat template leaves one image token per image; the model needs one
token per encoder output row. Returns where each item's run of tokens lies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from .errors import MediaError


class PlaceholderRange(msgspec.Struct, frozen=True):
    """The run of placeholder tokens of one image or video in the expanded prompt."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def expand_placeholders(
    token_ids: Sequence[int], counts: Mapping[int, Sequence[int]]
) -> tuple[list[int], dict[int, list[PlaceholderRange]]]:
    """``counts[token_id]`` lists, in prompt order, how many tokens each item whose placeholder is
    ``token_id`` takes (e.g. ``{image_token_id: [576, 576]}``, or Qwen2-VL's image and video
    tokens). Each occurrence of ``token_id`` becomes that many copies of it. Returns the expanded
    ids and, per token id, each item's range. A MediaError if a token id occurs a different number
    of times than it has items."""
    seen = {tok: 0 for tok in counts}
    out: list[int] = []
    ranges: dict[int, list[PlaceholderRange]] = {tok: [] for tok in counts}
    for tok in token_ids:
        if tok not in seen:
            out.append(tok)
            continue
        i = seen[tok]
        seen[tok] = i + 1
        if i < len(counts[tok]):
            n = counts[tok][i]
            if n < 1:
                raise MediaError(f"item {i} of placeholder token {tok} has {n} tokens; it needs at least 1")
            ranges[tok].append(PlaceholderRange(len(out), n))
            out.extend([tok] * n)
    for tok, n in seen.items():
        if n != len(counts[tok]):
            raise MediaError(
                f"the prompt has {n} placeholder token(s) {tok} "
                f"but {len(counts[tok])} item(s) were given for it"
            )
    return out, ranges
