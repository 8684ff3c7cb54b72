"""Per-request block tables over one BlockPool, with prefix caching and sliding windows."""

from __future__ import annotations

from collections.abc import Sequence

from .block_pool import BlockPool, KVCacheBlock
from .prefix_hash import BlockHash, hash_blocks


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Gives each request the blocks its tokens need; the slot of token i is
    ``block_ids[i // block_size] * block_size + i % block_size``.

    With ``enable_caching`` full blocks are registered under their chain hash as soon as they are
    scheduled (their K/V is written in that step, before any attention reads it), and a new
    request starts from the longest run of cached blocks of its prompt. With ``sliding_window``
    (every layer windowed) blocks that fall wholly out of the window go back to the pool.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[KVCacheBlock | None]] = {}  # None: freed, out of the window
        self._hashes: dict[str, list[BlockHash]] = {}
        self._hash_keys: dict[str, tuple[str | None, Sequence[tuple | None] | None]] = {}
        self._num_cached: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached

    # -- state -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        # a freed out-of-window entry keeps its place; attention never reads it
        return [0 if b is None else b.block_id for b in self._tables.get(request_id, ())]

    def num_held_blocks(self, request_id: str) -> int:
        return sum(b is not None for b in self._tables.get(request_id, ()))

    # -- prefix cache ------------------------------------------------------------------------

    def get_computed_blocks(
        self,
        request_id: str,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        extra_keys: Sequence[tuple | None] | None = None,
    ) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of ``token_ids`` (whole blocks, never the last token, which
        must be recomputed to produce logits) and its length in tokens. Takes no reference."""
        self._hash_keys[request_id] = (cache_salt, extra_keys)
        if not self.enable_caching:
            return [], 0
        hashes = self._extend_hashes(request_id, token_ids, (len(token_ids) - 1) // self.block_size)
        hits = []
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += len(token_ids)
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def _extend_hashes(self, request_id: str, token_ids: Sequence[int], num_blocks: int) -> list[BlockHash]:
        hashes = self._hashes.setdefault(request_id, [])
        if len(hashes) < num_blocks:
            salt, extra = self._hash_keys.get(request_id, (None, None))
            hashes.extend(
                hash_blocks(
                    token_ids[: num_blocks * self.block_size],
                    self.block_size,
                    start_block=len(hashes),
                    parent=hashes[-1] if hashes else None,
                    cache_salt=salt,
                    extra_keys=extra,
                )
            )
        return hashes[:num_blocks]

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> None:
        """Register the request's full blocks among its first ``num_tokens`` tokens."""
        if not self.enable_caching:
            return
        full = num_tokens // self.block_size
        done = self._num_cached.get(request_id, 0)
        if full <= done:
            return
        hashes = self._extend_hashes(request_id, token_ids, full)
        table = self._tables[request_id]
        for i in range(done, full):
            if table[i] is not None:
                self.pool.cache(table[i], hashes[i])
        self._num_cached[request_id] = full

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()

    # -- allocation --------------------------------------------------------------------------

    def allocate_slots(
        self,
        request_id: str,
        num_tokens: int,
        num_lookahead: int = 0,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_computed_tokens: int | None = None,
    ) -> list[int] | None:
        """Make room for the request's first ``num_tokens + num_lookahead`` tokens, starting the
        table with ``new_computed_blocks`` (prefix-cache hits) for a new request.

        Returns the ids of blocks added to the table (hits first), or None, changing nothing,
        if too few blocks are free. ``num_computed_tokens`` lets sliding-window requests give
        back blocks that no future token can see.
        """
        if num_computed_tokens is not None:
            self._remove_skipped_blocks(request_id, num_computed_tokens)
        table = self._tables.get(request_id, [])
        need = max(
            0, cdiv(num_tokens + num_lookahead, self.block_size) - len(table) - len(new_computed_blocks)
        )
        reviving = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if need + reviving > self.pool.num_free_blocks:
            return None
        self.pool.touch(list(new_computed_blocks))
        new = self.pool.allocate(need)
        table.extend(new_computed_blocks)
        table.extend(new)
        self._tables[request_id] = table
        if new_computed_blocks:
            self._num_cached[request_id] = len(new_computed_blocks)
        return [b.block_id for b in (*new_computed_blocks, *new)]

    def _remove_skipped_blocks(self, request_id: str, num_computed_tokens: int) -> None:
        if self.sliding_window is None:
            return
        table = self._tables.get(request_id)
        if not table:
            return
        # the next query is at position >= num_computed_tokens and sees keys > pos - window
        first_visible = max(0, num_computed_tokens - self.sliding_window + 1)
        for i in range(min(first_visible // self.block_size, len(table))):
            if table[i] is not None:
                self.pool.free([table[i]])
                table[i] = None

    def free(self, request_id: str) -> None:
        """Return all of a request's blocks (a no-op for a request holding none). The tail goes
        back first, so the block covering the longest prefix is evicted first and shared heads
        stay longest."""
        blocks = self._tables.pop(request_id, [])
        self.pool.free([b for b in reversed(blocks) if b is not None])
        self._hashes.pop(request_id, None)
        self._hash_keys.pop(request_id, None)
        self._num_cached.pop(request_id, None)
