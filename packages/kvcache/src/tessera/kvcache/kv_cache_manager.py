"""Per-request block tables, one per KV cache group, over one shared BlockPool, with prefix
caching and sliding windows."""

from __future__ import annotations

from collections.abc import Sequence

from .block_pool import BlockPool, KVCacheBlock
from .kv_cache_groups import KVCacheGroups, KVCacheSpec, cdiv, group_layers
from .prefix_hash import BlockHash, hash_blocks

# A table entry for a block before a sliding window: not held, never read by attention, and
# shown to the runner as this id so the table keeps its positions.
PLACEHOLDER_BLOCK_ID = 0

Table = list[KVCacheBlock | None]


class KVCacheManager:
    """Gives each request, in each group, the blocks its tokens need; in group g the slot of token
    i is ``block_ids[g][i // block_size] * block_size + i % block_size``.

    With ``enable_caching`` full blocks are registered under (group, chain hash) as soon as they
    are scheduled (their K/V is written in that step, before any attention reads it), and a new
    request starts from the longest prefix that every group can resume from: a full group needs
    every block of the prefix, a sliding group only the blocks of the window before its end.
    Sliding groups give back blocks that fall wholly out of their window.

    ``groups`` comes from :func:`group_layers`; without it there is one group, full attention or
    (``sliding_window``) every layer windowed.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_caching: bool = True,
        sliding_window: int | None = None,
        groups: KVCacheGroups | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if groups is not None and sliding_window is not None:
            raise ValueError("give either groups or sliding_window (a single group), not both")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.groups = groups if groups is not None else group_layers([KVCacheSpec(sliding_window)])
        self.windows: list[int | None] = [s.sliding_window for s in self.groups.specs]
        # groups of one spec are looked up together; full ones first, as their left-to-right scan
        # bounds the sliding ones' search
        by_window: dict[int | None, list[int]] = {}
        for g, w in enumerate(self.windows):
            by_window.setdefault(w, []).append(g)
        self._lookup_sets = sorted(by_window.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[Table]] = {}  # per group; None: not held, out of the window
        self._hashes: dict[str, list[BlockHash]] = {}
        self._hash_keys: dict[str, tuple[str | None, Sequence[tuple | None] | None]] = {}
        self._num_cached: dict[str, int] = {}  # blocks registered (or found) in every group
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found cached

    # -- state -------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return len(self.windows)

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

    def block_ids(self, request_id: str) -> list[list[int]]:
        """The request's table in each group (empty lists for a request holding none)."""
        tables = self._tables.get(request_id)
        if tables is None:
            return [[] for _ in self.windows]
        return [_ids(t) for t in tables]

    def num_held_blocks(self, request_id: str) -> list[int]:
        """Blocks the request holds in each group (placeholders not counted)."""
        tables = self._tables.get(request_id)
        if tables is None:
            return [0] * self.num_groups
        return [sum(b is not None for b in t) for t in tables]

    def blocks_for_context(self, num_tokens: int, tokens_per_step: int | None = None) -> list[int]:
        """Per group, the most blocks one request of ``num_tokens`` tokens holds at once when a
        step computes at most ``tokens_per_step`` of them."""
        return self.groups.blocks_for_context(num_tokens, self.block_size, tokens_per_step)

    # -- prefix cache ------------------------------------------------------------------------

    def get_computed_blocks(
        self,
        request_id: str,
        token_ids: Sequence[int],
        *,
        cache_salt: str | None = None,
        extra_keys: Sequence[tuple | None] | None = None,
    ) -> tuple[list[Table], int]:
        """The longest cached prefix of ``token_ids`` that every group can resume from (whole
        blocks, never the last token, which must be recomputed to produce logits): per group its
        blocks (None before a sliding window), and its length in tokens. Takes no reference."""
        self._hash_keys[request_id] = (cache_salt, extra_keys)
        if not self.enable_caching:
            return [[] for _ in self.windows], 0
        hashes = self._extend_hashes(request_id, token_ids, (len(token_ids) - 1) // self.block_size)
        hits, num_blocks = self._longest_hit(hashes)
        self.prefix_queries += len(token_ids)
        self.prefix_hits += num_blocks * self.block_size
        return hits, num_blocks * self.block_size

    def _longest_hit(self, hashes: list[BlockHash]) -> tuple[list[Table], int]:
        """Each set of groups accepts the candidate length or lowers it to the longest it can
        resume from; repeat until no set lowers it. Every set's answer is the longest valid length
        under its bound, so the fixed point is the longest length valid for all."""
        found: list[Table | None] = [None] * self.num_groups
        hit = len(hashes)
        while True:
            start = hit
            for window, gs in self._lookup_sets:
                if window is None and found[gs[0]] is not None:
                    for g in gs:  # a full prefix of n blocks contains the full prefix of any fewer
                        del found[g][hit:]
                else:
                    for g, blocks in zip(gs, self._scan(window, gs, hashes, hit), strict=True):
                        found[g] = blocks
                hit = len(found[gs[0]])
            if hit == start:
                return found, hit

    def _scan(self, window: int | None, gs: list[int], hashes: list[BlockHash], n: int) -> list[Table]:
        """Per group of ``gs``, the blocks of the longest prefix of at most ``n`` blocks that
        these groups (all with ``window``) can resume from."""

        def lookup(i: int) -> list[KVCacheBlock] | None:
            blocks = [self.pool.lookup((g, hashes[i])) for g in gs]
            return None if any(b is None for b in blocks) else blocks

        found: list[list[KVCacheBlock | None]] = [[] for _ in gs]
        if window is None:
            for i in range(n):
                blocks = lookup(i)
                if blocks is None:
                    break
                for col, b in zip(found, blocks, strict=True):
                    col.append(b)
            return found
        # the first token after a prefix of i blocks sees the window - 1 tokens before it
        need = cdiv(window - 1, self.block_size)
        found = [[None] * n for _ in gs]
        if need == 0:
            return found
        run = 0
        for i in range(n - 1, -1, -1):  # right to left: the first long enough run is the longest hit
            blocks = lookup(i)
            if blocks is None:
                run = 0
                continue
            for col, b in zip(found, blocks, strict=True):
                col[i] = b
            run += 1
            if run == need:
                return [col[: i + need] for col in found]
        return [col[:run] for col in found]  # a run from block 0 shorter than the window

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
        """Register the request's full blocks among its first ``num_tokens`` tokens, in every
        group that still holds them."""
        if not self.enable_caching:
            return
        full = num_tokens // self.block_size
        done = self._num_cached.get(request_id, 0)
        if full <= done:
            return
        hashes = self._extend_hashes(request_id, token_ids, full)
        for g, table in enumerate(self._tables[request_id]):
            for i in range(done, full):
                if table[i] is not None:
                    self.pool.cache(table[i], (g, hashes[i]))
        self._num_cached[request_id] = full

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()

    # -- allocation --------------------------------------------------------------------------

    def allocate_slots(
        self,
        request_id: str,
        num_tokens: int,
        num_lookahead: int = 0,
        new_computed_blocks: Sequence[Sequence[KVCacheBlock | None]] = (),
        num_computed_tokens: int | None = None,
    ) -> list[list[int]] | None:
        """Make room, in every group, for the request's first ``num_tokens + num_lookahead``
        tokens, starting a new request's tables with ``new_computed_blocks`` (the per-group
        prefix-cache hits of :meth:`get_computed_blocks`).

        Returns per group the ids of blocks added to the table (hits first, placeholders as
        PLACEHOLDER_BLOCK_ID), or None, changing nothing, if the pool can't serve every group.
        ``num_computed_tokens`` lets sliding groups give back blocks no future token can see.
        """
        tables = self._tables.get(request_id)
        hits = list(new_computed_blocks) or [()] * self.num_groups
        if len(hits) != self.num_groups:
            raise ValueError(f"new_computed_blocks has {len(hits)} groups, the cache has {self.num_groups}")
        if tables is None:
            tables = [[] for _ in self.windows]
        elif any(hits):
            raise ValueError(f"request {request_id} already has blocks; prefix hits start a new request")
        out_of_window = self._out_of_window(tables, num_computed_tokens)
        want = cdiv(num_tokens + num_lookahead, self.block_size)
        need = [max(0, want - len(t) - len(h)) for t, h in zip(tables, hits, strict=True)]
        reviving = sum(1 for h in hits for b in h if b is not None and b.ref_cnt == 0)
        released = sum(1 for g, i in out_of_window if tables[g][i].ref_cnt == 1)
        if sum(need) + reviving > self.pool.num_free_blocks + released:
            return None
        for g, i in out_of_window:
            self.pool.free([tables[g][i]])
            tables[g][i] = None
        # every group's hits leave the free list before any group allocates: an allocation
        # must not evict another group's hit
        self.pool.touch([b for h in hits for b in h if b is not None])
        added = []
        for table, h, n in zip(tables, hits, need, strict=True):
            new = self.pool.allocate(n)
            table.extend(h)
            table.extend(new)
            added.append(_ids(h) + [b.block_id for b in new])
        self._tables[request_id] = tables
        if hits[0]:
            self._num_cached[request_id] = len(hits[0])
        return added

    def _out_of_window(self, tables: list[Table], num_computed_tokens: int | None) -> list[tuple[int, int]]:
        """(group, index) of held blocks that the next query (at ``num_computed_tokens`` or
        later) and every one after it cannot see."""
        if num_computed_tokens is None:
            return []
        out = []
        for g, (table, window) in enumerate(zip(tables, self.windows, strict=True)):
            if window is None:
                continue
            # the query at position p sees keys > p - window
            first_visible = max(0, num_computed_tokens - window + 1)
            # what went before is a run of placeholders: walk back to it, O(1) a step
            i = min(first_visible // self.block_size, len(table)) - 1
            while i >= 0 and table[i] is not None:
                out.append((g, i))
                i -= 1
        return out

    def free(self, request_id: str) -> None:
        """Return all of a request's blocks in every group (a no-op for a request holding none).
        The tail goes back first, so the block covering the longest prefix is evicted first and
        shared heads stay longest."""
        for table in self._tables.pop(request_id, ()):
            self.pool.free([b for b in reversed(table) if b is not None])
        self._hashes.pop(request_id, None)
        self._hash_keys.pop(request_id, None)
        self._num_cached.pop(request_id, None)


def _ids(blocks: Sequence[KVCacheBlock | None]) -> list[int]:
    return [PLACEHOLDER_BLOCK_ID if b is None else b.block_id for b in blocks]
