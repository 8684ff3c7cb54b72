"""The encoder cache: LRU eviction order within the byte budget, pinned entries never evicted,
counters, and the invariants under any sequence of operations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.multimodal import EncoderCache


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def tensor(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4, dtype=torch.float32)


def test_a_put_then_get_is_a_hit_and_an_unknown_key_a_miss():
    cache = EncoderCache(1000)
    value = tensor(400)
    assert cache.put(key(1), value)
    assert cache.get(key(1)) is value and cache.get(key(2)) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.bytes, stats.entries) == (1, 1, 400, 1)


def test_the_least_recently_used_entry_is_evicted_first():
    cache = EncoderCache(1000)
    for i in range(3):
        cache.put(key(i), tensor(300))
    cache.get(key(0))  # now 1 is the oldest
    cache.put(key(3), tensor(300))
    assert cache.keys() == [key(2), key(0), key(3)]
    cache.put(key(4), tensor(600))
    assert cache.keys() == [key(3), key(4)] and cache.stats().evictions == 3
    assert cache.stats().bytes == 900


def test_a_pinned_entry_is_never_evicted_and_becomes_evictable_when_unpinned():
    cache = EncoderCache(1000)
    cache.put(key(0), tensor(400), pin=True)
    cache.put(key(1), tensor(400))
    cache.put(key(2), tensor(400))  # evicts 1, not the older but pinned 0
    assert cache.keys() == [key(0), key(2)]
    cache.unpin(key(0))
    cache.put(key(3), tensor(400))
    assert cache.keys() == [key(2), key(3)]


def test_pins_are_counted_so_two_requests_must_both_unpin():
    cache = EncoderCache(500)
    cache.put(key(0), tensor(400), pin=True)
    assert cache.get(key(0), pin=True) is not None and cache.pin_count(key(0)) == 2
    cache.unpin(key(0))
    assert not cache.put(key(1), tensor(400))  # still pinned: no room, nothing evicted
    assert cache.keys() == [key(0)]
    cache.unpin(key(0))
    assert cache.put(key(1), tensor(400)) and cache.keys() == [key(1)]


def test_an_unpinned_put_that_cannot_fit_stores_nothing_and_evicts_nothing():
    cache = EncoderCache(1000)
    cache.put(key(0), tensor(600), pin=True)
    cache.put(key(1), tensor(200))
    assert not cache.put(key(2), tensor(500))
    assert cache.keys() == [key(0), key(1)] and cache.stats().evictions == 0
    assert not cache.put(key(3), tensor(2000))  # larger than the whole budget


def test_a_pinned_put_may_exceed_the_budget_and_the_excess_goes_when_unpinned():
    cache = EncoderCache(1000)
    cache.put(key(0), tensor(800), pin=True)
    cache.put(key(1), tensor(100))
    assert cache.put(key(2), tensor(800), pin=True)  # a running request needs it
    assert cache.keys() == [key(0), key(2)] and cache.stats().bytes == 1600
    cache.unpin(key(0))
    assert cache.keys() == [key(2)] and cache.stats().bytes == 800


def test_a_view_of_a_larger_tensor_is_copied_so_the_cache_holds_only_what_it_counts():
    batch = torch.zeros(10, 100)
    cache = EncoderCache(10_000)
    cache.put(key(0), batch[2:3])
    stored = cache.get(key(0))
    assert stored.untyped_storage().nbytes() == 400 and cache.stats().bytes == 400


def test_unpinning_a_key_that_is_not_pinned_and_pinning_a_missing_key_are_key_errors():
    cache = EncoderCache(100)
    with pytest.raises(KeyError, match="not cached"):
        cache.pin(key(5))
    cache.put(key(5), tensor(40))
    with pytest.raises(KeyError, match="not pinned"):
        cache.unpin(key(5))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "put_pin", "get", "get_pin", "unpin"]),
            st.integers(0, 7),
            st.integers(1, 6),
        ),
        max_size=60,
    )
)
def test_bytes_are_counted_and_the_budget_holds_whenever_nothing_is_pinned(ops):
    cache = EncoderCache(1000)
    pins: dict[bytes, int] = {}
    for op, i, size in ops:
        k = key(i)
        if op.startswith("put"):
            if cache.put(k, tensor(size * 100), pin=op == "put_pin") and op == "put_pin":
                pins[k] = pins.get(k, 0) + 1
        elif op.startswith("get"):
            if cache.get(k, pin=op == "get_pin") is not None and op == "get_pin":
                pins[k] = pins.get(k, 0) + 1
        elif pins.get(k):
            cache.unpin(k)
            pins[k] -= 1
        held = [cache._entries[k] for k in cache.keys()]
        assert cache.stats().bytes == sum(t.numel() * 4 for t in held)
        assert all(k in cache for k, n in pins.items() if n)  # pinned entries survive
        if not any(pins.values()):
            assert cache.stats().bytes <= 1000
