"""KV cache groups: how layers are grouped, and the invariants of one pool shared by full and
sliding-window groups under any sequence of admissions, prefix hits, growth and frees."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.kvcache import (
    PLACEHOLDER_BLOCK_ID,
    KVCacheManager,
    KVCacheSpec,
    cdiv,
    group_layers,
    hash_blocks,
)

FULL = KVCacheSpec()


def gemma3_270m_specs() -> list[KVCacheSpec]:
    return [FULL if i % 6 == 5 else KVCacheSpec(512) for i in range(18)]


def test_gemma3_270m_has_one_full_and_five_sliding_groups_of_three_layers():
    groups = group_layers(gemma3_270m_specs())
    assert groups.group_size == 3 and len(groups) == 6
    assert groups.groups[0].spec == FULL and groups.groups[0].layers == (5, 11, 17)
    assert [g.layers for g in groups.groups[1:]] == [
        (0, 1, 2),
        (3, 4, 6),
        (7, 8, 9),
        (10, 12, 13),
        (14, 15, 16),
    ]
    assert all(g.spec.sliding_window == 512 for g in groups.groups[1:])
    # every layer has one (group, tensor) and no two layers of a group share a tensor
    slots = [groups.layer_slot(layer) for layer in range(18)]
    assert len(set(slots)) == 18 and all(j < 3 for _, j in slots)
    assert groups.layer_slot(11) == (0, 1)


def test_a_llama_model_is_one_full_group_of_all_its_layers():
    groups = group_layers([KVCacheSpec(None, 8, 64)] * 16)
    assert len(groups) == 1 and groups.group_size == 16 and groups.groups[0].layers == tuple(range(16))


def test_group_size_is_the_fewest_layers_of_a_kind_or_the_most_when_counts_are_close():
    # 4 full, 22 sliding (Gemma 3 1B): groups of 4, the last sliding group short
    groups = group_layers([FULL if i % 6 == 5 else KVCacheSpec(512) for i in range(26)])
    assert groups.group_size == 4 and [len(g.layers) for g in groups.groups] == [4, 4, 4, 4, 4, 4, 2]
    # 8 and 9 layers: one group each of 9 rather than three groups
    groups = group_layers([FULL] * 8 + [KVCacheSpec(8)] * 9)
    assert groups.group_size == 9 and len(groups) == 2


def test_layers_of_different_windows_never_share_a_group():
    groups = group_layers([KVCacheSpec(4), KVCacheSpec(8), KVCacheSpec(4), KVCacheSpec(8)])
    assert [(g.spec.sliding_window, g.layers) for g in groups.groups] == [(4, (0, 2)), (8, (1, 3))]


def test_a_32k_context_of_gemma3_holds_about_a_sixth_of_a_full_cache():
    bs = 16
    groups = group_layers(gemma3_270m_specs())
    kv = KVCacheManager(20_000, bs, groups=groups, enable_caching=False)
    kv.allocate_slots("a", 1024)
    t0 = time.perf_counter()
    for c in range(1024, 32_768):  # decode to 32k, one token a step
        assert kv.allocate_slots("a", c + 1, num_computed_tokens=c) is not None
    assert time.perf_counter() - t0 < 10  # freeing the window's tail is O(1) a step
    held = kv.num_held_blocks("a")
    assert held[0] == 2048 and all(h <= cdiv(512, bs) + 1 for h in held[1:])
    full_cache = 6 * 2048  # every group holding every block
    assert sum(held) / full_cache < 1 / 6 + 0.02
    # the planning estimate agrees with what the request held
    assert kv.blocks_for_context(32_768, tokens_per_step=1) == [2048] + [cdiv(511, bs) + 1] * 5
    kv.free("a")
    assert kv.num_free_blocks == 20_000


def test_a_sliding_group_resumes_from_the_window_even_after_its_head_was_evicted():
    bs, w = 4, 8
    kv = KVCacheManager(40, bs, groups=group_layers([FULL, KVCacheSpec(w)]))
    prompt = list(range(40))
    kv.allocate_slots("a", 40)
    kv.cache_blocks("a", prompt, 40)
    kv.free("a")
    hashes = hash_blocks(prompt, bs)
    for i in range(8):  # the sliding group's head blocks are evicted
        kv.pool._evict(kv.pool.lookup((1, hashes[i])))
    hits, n = kv.get_computed_blocks("b", prompt + [99])
    assert n == 40
    # the sliding group holds only the blocks the next token can see: positions 33..39
    assert hits[1][: 40 // bs - cdiv(w - 1, bs)] == [None] * 8
    assert all(b is not None for b in hits[1][8:])
    assert kv.allocate_slots("b", 41, new_computed_blocks=hits) is not None
    ids = kv.block_ids("b")
    assert ids[1][:8] == [PLACEHOLDER_BLOCK_ID] * 8
    assert kv.num_held_blocks("b") == [11, 3]


def test_the_hit_is_the_longest_length_every_group_can_resume_from():
    bs = 2
    kv = KVCacheManager(64, bs, groups=group_layers([FULL, KVCacheSpec(3)]))
    prompt = list(range(20))
    kv.allocate_slots("a", 20)
    kv.cache_blocks("a", prompt, 20)
    hashes = hash_blocks(prompt, bs)
    kv.free("a")
    # drop the sliding group's block 7 (tokens 14, 15) from the cache: at 18 the window needs
    # block 8 only, at 16 it needs block 7, so the hit falls to... 18 still: block 8 is there
    kv.pool._evict(kv.pool.lookup((1, hashes[7])))
    assert kv.get_computed_blocks("b", prompt)[1] == 18
    # drop block 8 too: 18 and 16 fail, 14 needs block 6: a hit of 14 tokens
    kv.pool._evict(kv.pool.lookup((1, hashes[8])))
    assert kv.get_computed_blocks("c", prompt)[1] == 14
    # the full group missing block 5 bounds everything at 10
    kv.pool._evict(kv.pool.lookup((0, hashes[5])))
    hits, n = kv.get_computed_blocks("d", prompt)
    assert n == 10 and len(hits[0]) == len(hits[1]) == 5 and hits[1][:4] == [None] * 4


def test_a_refused_allocation_changes_nothing_in_any_group():
    kv = KVCacheManager(6, 4, groups=group_layers([FULL, KVCacheSpec(4)]))
    assert kv.allocate_slots("a", 8) is not None  # 2 blocks in each group
    before = (kv.num_free_blocks, kv.block_ids("a"))
    assert kv.allocate_slots("a", 16, num_computed_tokens=8) is None  # 2 more each: 4 > 2 + 1 out of window
    assert (kv.num_free_blocks, kv.block_ids("a")) == before
    assert kv.allocate_slots("a", 12, num_computed_tokens=8) is not None  # 1 each, block 0 of the window
    assert kv.num_held_blocks("a") == [3, 2]


# -- the property test ---------------------------------------------------------------------------


class FakeCache:
    """Stores (group, token) in each slot instead of K/V, so a hit can be checked for content and
    for which group wrote it."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.contents: dict[int, list] = {}

    def write(self, rid: str, tokens: list[int], start: int, end: int) -> None:
        bs = self.kv.block_size
        for g, ids in enumerate(self.kv.block_ids(rid)):
            for p in range(start, end):
                self.contents.setdefault(ids[p // bs], [None] * bs)[p % bs] = (g, tokens[p])

    def check_hit(self, rid: str, tokens: list[int], num_hit: int) -> None:
        bs = self.kv.block_size
        for g, (ids, w) in enumerate(zip(self.kv.block_ids(rid), self.kv.windows, strict=True)):
            visible = 0 if w is None else max(0, num_hit - w + 1)  # what the next token can see
            for p in range(visible, num_hit):
                assert self.contents[ids[p // bs]][p % bs] == (g, tokens[p]), "a hit holds other tokens"


def check_invariants(kv: KVCacheManager) -> None:
    pool = kv.pool
    free = [b.block_id for b in pool.free_queue]
    assert len(free) == len(set(free)) == pool.num_free_blocks
    holders: dict[int, int] = {}
    owner: dict[int, int] = {}
    for tables in kv._tables.values():
        assert len(tables) == kv.num_groups
        for g, table in enumerate(tables):
            for b in table:
                if b is not None:
                    holders[b.block_id] = holders.get(b.block_id, 0) + 1
                    assert owner.setdefault(b.block_id, g) == g, "two groups hold one block"
    assert not set(free) & set(holders), "a block is both free and in use"
    assert len(free) + len(holders) == pool.num_blocks, "blocks were lost or duplicated"
    for b in pool.blocks:
        assert b.ref_cnt == holders.get(b.block_id, 0), "reference count != number of holders"
    for key, b in pool.cached.items():
        assert b.block_hash == key
        assert owner.get(b.block_id, key[0]) == key[0], "a block cached for one group is held by another"


def best_hit(kv: KVCacheManager, tokens: list[int]) -> int:
    """By brute force: the longest whole-block prefix (never the last token) that every group can
    resume from given what the pool has cached."""
    bs = kv.block_size
    hashes = hash_blocks(tokens[: (len(tokens) - 1) // bs * bs], bs)
    for n in range(len(hashes), -1, -1):
        ok = True
        for g, w in enumerate(kv.windows):
            first = 0 if w is None else max(0, n - cdiv(w - 1, bs))
            ok = ok and all(kv.pool.lookup((g, hashes[i])) is not None for i in range(first, n))
        if ok:
            return n * bs
    raise AssertionError("unreachable: zero blocks always resume")


layouts = st.lists(st.sampled_from([None, 1, 3, 5, 8]), min_size=1, max_size=4)
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=28)  # tiny alphabet: shared prefixes
ops_st = st.lists(
    st.tuples(
        st.sampled_from(["admit", "grow", "grow", "free"]),
        st.integers(0, 4),
        tokens_st,
        st.integers(0, 2),  # lookahead
    ),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(
    windows=layouts,
    num_blocks=st.integers(2, 40),
    block_size=st.sampled_from([1, 2, 4]),
    ops=ops_st,
)
def test_any_group_layout_conserves_blocks_hits_hold_the_right_tokens_and_windows_stay_bounded(
    windows, num_blocks, block_size, ops
):
    bs = block_size
    kv = KVCacheManager(num_blocks, bs, groups=group_layers([KVCacheSpec(w) for w in windows]))
    fake = FakeCache(kv)
    live: dict[str, list[int]] = {}
    reach: dict[str, int] = {}  # tokens a request's tables cover, lookahead included
    for op, r, toks, lookahead in ops:
        rid = f"r{r}"
        snapshot = (kv.num_free_blocks, kv.block_ids(rid), dict(kv.pool.cached))
        if op == "admit" and rid not in live:
            want = best_hit(kv, toks)
            hits, num_hit = kv.get_computed_blocks(rid, toks)
            assert num_hit == want, "not the longest prefix every group can resume from"
            assert num_hit <= len(toks) - 1 and all(len(h) == num_hit // bs for h in hits)
            if kv.allocate_slots(rid, len(toks), lookahead, new_computed_blocks=hits) is None:
                assert (kv.num_free_blocks, kv.block_ids(rid), dict(kv.pool.cached)) == snapshot
                kv.free(rid)
                continue
            fake.check_hit(rid, toks, num_hit)
            kv.cache_blocks(rid, toks, len(toks))
            fake.write(rid, toks, num_hit, len(toks))
            live[rid] = list(toks)
            reach[rid] = len(toks) + lookahead
        elif op == "grow" and rid in live:
            seq = live[rid]
            new = seq + toks[: 1 + len(toks) % 4]
            c, n = len(seq), len(new) - len(seq)
            if kv.allocate_slots(rid, len(new), lookahead, num_computed_tokens=c) is None:
                assert (kv.num_free_blocks, kv.block_ids(rid), dict(kv.pool.cached)) == snapshot
                continue
            kv.cache_blocks(rid, new, len(new))
            fake.write(rid, new, c, len(new))
            live[rid] = new
            reach[rid] = max(reach[rid], len(new) + lookahead)
            ahead = reach[rid] - len(new)
            for w, held in zip(kv.windows, kv.num_held_blocks(rid), strict=True):
                if w is not None:
                    # the window before the step's first token, the step's tokens, the lookahead
                    assert held <= cdiv(w + n + ahead - 2, bs) + 1
                    if n == 1 and c >= w:
                        assert held <= cdiv(w, bs) + 1 + cdiv(ahead, bs)
        elif op == "free":
            kv.free(rid)
            live.pop(rid, None)
            reach.pop(rid, None)
        check_invariants(kv)
    for rid in list(live):
        kv.free(rid)
    check_invariants(kv)
    assert kv.num_free_blocks == num_blocks


def test_groups_and_a_sliding_window_are_not_given_together():
    with pytest.raises(ValueError, match="not both"):
        KVCacheManager(4, 4, sliding_window=4, groups=group_layers([FULL]))
