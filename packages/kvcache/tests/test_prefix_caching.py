"""Prefix caching: hits return blocks that really hold the same tokens; sharing keeps counts
right; eviction is lazy and ordered; hashes are stable and salted."""

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.kvcache import KVCacheManager, hash_blocks


class FakeCache:
    """A KV cache that stores token ids instead of K/V, so a hit can be checked for content."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.contents: dict[int, list[int | None]] = {}

    def write(self, rid: str, tokens: list[int], start: int, end: int) -> None:
        bs = self.kv.block_size
        (ids,) = self.kv.block_ids(rid)
        for p in range(start, end):
            self.contents.setdefault(ids[p // bs], [None] * bs)[p % bs] = tokens[p]

    def check_hit(self, rid: str, tokens: list[int], num_hit: int) -> None:
        bs = self.kv.block_size
        (ids,) = self.kv.block_ids(rid)
        for p in range(num_hit):
            assert self.contents[ids[p // bs]][p % bs] == tokens[p], "a cache hit holds other tokens"


def check_invariants(kv: KVCacheManager) -> None:
    pool = kv.pool
    free = [b.block_id for b in pool.free_queue]
    assert len(free) == len(set(free)) == pool.num_free_blocks
    holders: dict[int, int] = {}
    for rid in kv._tables:
        for b in kv._tables[rid][0]:
            if b is not None:
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
    assert not set(free) & set(holders), "a block is both free and in use"
    assert len(free) + len(holders) == pool.num_blocks, "blocks were lost or duplicated"
    for b in pool.blocks:
        assert b.ref_cnt == holders.get(b.block_id, 0), "reference count != number of holders"
    for h, b in pool.cached.items():
        assert b.block_hash == h


tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=24)  # tiny alphabet: many shared prefixes
ops_st = st.lists(
    st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 4), tokens_st), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]), ops=ops_st)
def test_hits_hold_the_right_tokens_and_every_block_comes_back(num_blocks, block_size, ops):
    kv = KVCacheManager(num_blocks, block_size, enable_caching=True)
    fake = FakeCache(kv)
    live: dict[str, list[int]] = {}
    for op, r, toks in ops:
        rid = f"r{r}"
        if op == "admit" and rid not in live:
            hits, num_hit = kv.get_computed_blocks(rid, toks)
            assert num_hit <= len(toks) - 1  # the last token is always recomputed
            before = kv.num_free_blocks
            if kv.allocate_slots(rid, len(toks), new_computed_blocks=hits) is None:
                assert kv.num_free_blocks == before
                kv.free(rid)
                continue
            fake.check_hit(rid, toks, num_hit)
            kv.cache_blocks(rid, toks, len(toks))
            fake.write(rid, toks, num_hit, len(toks))
            live[rid] = list(toks)
        elif op == "grow" and rid in live:
            seq = live[rid]
            new = seq + toks[:3]
            if kv.allocate_slots(rid, len(new)) is not None:
                kv.cache_blocks(rid, new, len(new))
                fake.write(rid, new, len(seq), len(new))
                live[rid] = new
        elif op == "free":
            kv.free(rid)
            live.pop(rid, None)
        check_invariants(kv)
    for rid in list(live):
        kv.free(rid)
    check_invariants(kv)
    assert kv.num_free_blocks == num_blocks


def test_a_shared_prefix_is_computed_once_and_shared():
    kv = KVCacheManager(16, 4)
    prompt = list(range(10))
    hits, n = kv.get_computed_blocks("a", prompt)
    assert n == 0
    kv.allocate_slots("a", 10, new_computed_blocks=hits)
    kv.cache_blocks("a", prompt, 10)
    hits, n = kv.get_computed_blocks("b", prompt[:8] + [99, 98])
    assert n == 8 and [b.block_id for b in hits[0]] == kv.block_ids("a")[0][:2]
    kv.allocate_slots("b", 10, new_computed_blocks=hits)
    assert [b.ref_cnt for b in hits[0]] == [2, 2]
    assert kv.prefix_hits == 8 and kv.prefix_queries == 20


def test_the_last_prompt_token_is_always_recomputed():
    kv = KVCacheManager(16, 4)
    kv.allocate_slots("a", 8)
    kv.cache_blocks("a", list(range(8)), 8)
    _, n = kv.get_computed_blocks("b", list(range(8)))
    assert n == 4  # not 8: the model must run on at least the last token


def test_freed_blocks_stay_cached_until_reused_and_the_tail_goes_first():
    kv = KVCacheManager(4, 2)
    prompt = [1, 2, 3, 4, 5, 6]
    kv.allocate_slots("a", 6)
    kv.cache_blocks("a", prompt, 6)
    kv.free("a")
    assert len(kv.pool.cached) == 3  # lazy eviction: still findable
    _, n = kv.get_computed_blocks("b", prompt + [7])
    assert n == 6
    kv.allocate_slots("x", 2)  # takes the never-used block 3
    kv.allocate_slots("y", 2)  # evicts the tail block of "a" first
    _, n = kv.get_computed_blocks("c", prompt + [7])
    assert n == 4


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(16, 4)
    prompt = list(range(9))
    kv.get_computed_blocks("a", prompt, cache_salt="tenant-1")
    kv.allocate_slots("a", 9)
    kv.cache_blocks("a", prompt, 9)
    assert kv.get_computed_blocks("b", prompt, cache_salt="tenant-2")[1] == 0
    assert kv.get_computed_blocks("c", prompt, cache_salt="tenant-1")[1] == 8
    assert kv.get_computed_blocks("d", prompt)[1] == 0


def test_extra_keys_change_the_hash_of_their_block_and_all_after_it():
    plain = hash_blocks(list(range(12)), 4)
    extra = hash_blocks(list(range(12)), 4, extra_keys=[None, ("image", "abc"), None])
    assert plain[0] == extra[0] and plain[1] != extra[1] and plain[2] != extra[2]


def test_hashes_are_stable_across_processes():
    code = (
        "from tessera.kvcache import hash_blocks; "
        "print(hash_blocks(list(range(8)), 4, cache_salt='s')[-1].hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == hash_blocks(list(range(8)), 4, cache_salt="s")[-1].hex()


def test_sliding_window_frees_blocks_out_of_the_window():
    kv = KVCacheManager(8, 4, sliding_window=6)
    kv.allocate_slots("a", 16)  # 4 blocks
    assert kv.num_held_blocks("a") == [4]
    # the next token is at position 16 and sees positions 11..16: blocks 0 and 1 are out
    kv.allocate_slots("a", 17, num_computed_tokens=16)
    assert kv.num_held_blocks("a") == [3]  # blocks 2, 3 and the new block 4
    kv.free("a")
    assert kv.num_free_blocks == 8


def test_reset_forgets_every_cached_block():
    kv = KVCacheManager(8, 2)
    kv.allocate_slots("a", 6)
    kv.cache_blocks("a", list(range(6)), 6)
    kv.free("a")
    assert kv.reset_prefix_cache() == 3
    assert kv.get_computed_blocks("b", list(range(7)))[1] == 0
