"""Invariants of the block pool and the manager under any sequence of operations."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.kvcache import BlockPool, KVCacheManager, kv_bytes_per_token, num_blocks_for_budget


def check_invariants(kv: KVCacheManager) -> None:
    pool = kv.pool
    free_ids = [b.block_id for b in pool.free_queue]
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
    held = [b.block_id for rid in kv._tables for t in kv._tables[rid] for b in t if b is not None]
    # no block is both free and in use, and the count is conserved
    assert not set(free_ids) & set(held)
    assert len(free_ids) + len(set(held)) == pool.num_blocks
    # reference counts equal the number of holders
    for b in pool.blocks:
        assert b.ref_cnt == held.count(b.block_id)


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 5), st.integers(1, 70)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 20), block_size=st.sampled_from([1, 4, 16]), ops=ops)
def test_blocks_are_conserved_and_all_free_at_the_end(num_blocks, block_size, ops):
    kv = KVCacheManager(num_blocks, block_size)
    want: dict[str, int] = {}
    for op, r, n in ops:
        rid = f"r{r}"
        if op == "alloc":
            target = max(want.get(rid, 0), n)
            before = kv.num_free_blocks
            new = kv.allocate_slots(rid, target)
            if new is None:
                assert kv.num_free_blocks == before  # a refusal changes nothing
            else:
                want[rid] = target
                assert len(kv.block_ids(rid)[0]) * block_size >= target
        else:
            kv.free(rid)
            want.pop(rid, None)
        check_invariants(kv)
    for rid in list(want):
        kv.free(rid)
    assert kv.num_free_blocks == num_blocks
    check_invariants(kv)


def test_freed_tail_blocks_are_reused_first():
    kv = KVCacheManager(4, 2)
    kv.allocate_slots("a", 6)  # blocks 0, 1, 2
    kv.free("a")
    # the tail (2) went back first, then 1, then 0: the free list reads 3, 2, 1, 0
    assert [b.block_id for b in kv.pool.free_queue] == [3, 2, 1, 0]


def test_pool_refuses_to_free_a_block_twice():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    try:
        pool.free([b])
    except ValueError as e:
        assert "freed more often" in str(e)
    else:
        raise AssertionError("double free accepted")


def test_memory_planning_arithmetic():
    per_token = kv_bytes_per_token(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32")
    assert per_token == 46080
    assert num_blocks_for_budget(64 * 2**20, 16, per_token) == 91
    # int8 stores one byte per element plus a float32 scale per token and head
    assert kv_bytes_per_token(30, 3, 64, "int8") == 2 * 30 * 3 * (64 + 4)
