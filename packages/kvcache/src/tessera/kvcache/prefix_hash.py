"""Block hashes for prefix caching: a chain over full blocks, stable across processes.

``hash(parent, token_ids, extra_keys)`` with BLAKE2b over a msgpack encoding, so two
processes (or machines) agree, unlike Python's salted ``hash``. ``extra_keys`` carries what else
makes a block's KV differ for the same tokens: multimodal input hashes, an adapter id, and the
request's ``cache_salt`` (in the first block only: the chain carries it on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

BlockHash = bytes

_encode = msgspec.msgpack.Encoder().encode


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple | None = None
) -> BlockHash:
    payload = _encode((parent, list(token_ids), extra_keys))
    return hashlib.blake2b(payload, digest_size=16).digest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    *,
    start_block: int = 0,
    parent: BlockHash | None = None,
    cache_salt: str | None = None,
    extra_keys: Sequence[tuple | None] | None = None,
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids`` from ``start_block`` on (``parent`` is the hash
    of the block before it). ``extra_keys[i]`` is the extra key tuple of block i, if any."""
    out = []
    for b in range(start_block, len(token_ids) // block_size):
        extra = extra_keys[b] if extra_keys is not None and b < len(extra_keys) else None
        if b == 0 and cache_salt is not None:
            extra = ("salt", cache_salt, *(extra or ()))
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size], extra)
        out.append(parent)
    return out
