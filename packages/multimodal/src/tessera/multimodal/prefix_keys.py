"""The prefix cache's ``extra_keys`` for a prompt with images: per KV block, the content hashes
of the items whose placeholder tokens lie in it (as vLLM does), so that two prompts with equal
tokens and different images never share a block. Feed the list to tessera.kvcache's
``KVCacheManager.get_computed_blocks(..., extra_keys=...)`` / ``hash_blocks``."""

from __future__ import annotations

from collections.abc import Sequence

from .content_hash import ContentHash
from .placeholders import PlaceholderRange


def block_extra_keys(
    items: Sequence[tuple[PlaceholderRange, ContentHash]], num_tokens: int, block_size: int
) -> list[tuple[ContentHash, ...] | None]:
    """For each block of ``num_tokens`` tokens (the last may be partial), a tuple of the hashes
    (bytes, in prompt order) of the items whose ranges overlap it, or None for a text-only block."""
    num_blocks = -(-num_tokens // block_size)
    keys: list[list[ContentHash]] = [[] for _ in range(num_blocks)]
    for rng, digest in sorted(items, key=lambda item: item[0].offset):
        if rng.length <= 0:
            continue
        for b in range(rng.offset // block_size, min(num_blocks, -(-rng.end // block_size))):
            keys[b].append(digest)
    return [tuple(k) if k else None for k in keys]
