"""Per-request block tables over one BlockPool."""

from __future__ import annotations

from .block_pool import BlockPool, KVCacheBlock


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Gives each request the blocks its tokens need; slot of token i is
    ``block_ids[i // block_size] * block_size + i % block_size``."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[KVCacheBlock]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._tables.get(request_id, ())]

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        have = len(self._tables.get(request_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def allocate_slots(self, request_id: str, num_tokens: int, num_lookahead: int = 0) -> list[int] | None:
        """Make room for the request's first ``num_tokens + num_lookahead`` tokens.

        Returns the ids of newly added blocks, or None (changing nothing) if too few are free.
        """
        need = self.blocks_needed(request_id, num_tokens + num_lookahead)
        if need > self.pool.num_free_blocks:
            return None
        new = self.pool.allocate(need)
        self._tables.setdefault(request_id, []).extend(new)
        return [b.block_id for b in new]

    def free(self, request_id: str) -> None:
        """Return all of a request's blocks (a no-op for a request holding none). The tail goes
        back first so the head of the sequence is the last to be reused."""
        blocks = self._tables.pop(request_id, [])
        self.pool.free(list(reversed(blocks)))
