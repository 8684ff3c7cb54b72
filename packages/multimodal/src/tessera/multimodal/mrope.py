"""Qwen2-VL's M-RoPE positions: three position ids (temporal, height, width) per token.

Text tokens have equal ids that count on one by one; an image or video's tokens have ids
start + (t, row, column) over its merged grid, and the text after it continues from the largest
id in the run plus one (start + max(t, h, w)), as in Qwen2-VL's original ``get_rope_index``.
Decode tokens at index j >= len(prompt) take j + delta in all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import MediaError
from .placeholders import PlaceholderRange


def mrope_positions(
    num_tokens: int,
    vision: Sequence[tuple[PlaceholderRange, Sequence[int]]],
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """([3, num_tokens] int64 positions, delta) for a prompt whose vision runs are ``vision``:
    (range, (t, h, w) grid in patches before merging) per image or video, in any order. ``delta``
    is max position + 1 - num_tokens."""
    m = spatial_merge_size
    pos = torch.empty(3, num_tokens, dtype=torch.int64)
    cur = 0  # the next text position
    i = 0  # the next token index
    for rng, (t, h, w) in sorted(vision, key=lambda v: v[0].offset):
        gh, gw = h // m, w // m
        if rng.length != t * gh * gw:
            raise MediaError(f"placeholder run of {rng.length} tokens for a grid of {t}x{h}x{w} (merge {m})")
        if rng.offset < i or rng.end > num_tokens:
            raise MediaError(f"placeholder run {rng.offset}..{rng.end} overlaps another or the prompt's end")
        pos[:, i : rng.offset] = torch.arange(cur, cur + rng.offset - i)
        cur += rng.offset - i
        grid = pos[:, rng.offset : rng.end].view(3, t, gh, gw)
        grid[0] = torch.arange(t).view(t, 1, 1) + cur
        grid[1] = torch.arange(gh).view(1, gh, 1) + cur
        grid[2] = torch.arange(gw).view(1, 1, gw) + cur
        cur += max(t, gh, gw)
        i = rng.end
    pos[:, i:] = torch.arange(cur, cur + num_tokens - i)
    cur += num_tokens - i
    return pos, cur - num_tokens
