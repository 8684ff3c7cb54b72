"""Encoder outputs kept across requests, keyed by the content hash of the processed input, within
a byte budget: least recently used first out, never an entry a running request has pinned."""

from __future__ import annotations

import threading
from collections import OrderedDict

import msgspec
import torch

from .content_hash import ContentHash


class EncoderCacheStats(msgspec.Struct, frozen=True):
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int
    pinned_entries: int
    budget_bytes: int


class EncoderCache:
    """An LRU map from content hash to tensor, at most ``budget_bytes`` of tensors (a tensor's
    bytes are numel x element size; a view of a larger storage is copied on ``put`` so that the
    cache never holds more than it counts). ``pin`` / ``unpin`` keep a reference count: a pinned
    entry is never evicted. A lock guards every operation."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[ContentHash, torch.Tensor] = OrderedDict()  # oldest first
        self._pins: dict[ContentHash, int] = {}
        self._bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key: ContentHash, *, pin: bool = False) -> torch.Tensor | None:
        """The cached tensor (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            if pin:
                self._pins[key] = self._pins.get(key, 0) + 1
            return value

    def put(self, key: ContentHash, value: torch.Tensor, *, pin: bool = False) -> bool:
        """Store ``value`` (pinned once if ``pin``), evicting unpinned entries oldest first to make
        room. Without ``pin`` it is stored only if it fits the budget; with ``pin`` always (a
        running request needs it), beyond the budget if pinned entries fill it. Returns whether
        the key is now cached. A key already cached keeps its value."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                if pin:
                    self._pins[key] = self._pins.get(key, 0) + 1
                return True
            nbytes = value.numel() * value.element_size()
            if not pin and nbytes > self.budget_bytes - self._pinned_bytes():
                return False
            if value.untyped_storage().nbytes() > nbytes:
                value = value.clone()
            self._evict(self.budget_bytes - nbytes)
            self._entries[key] = value
            self._bytes += nbytes
            if pin:
                self._pins[key] = 1
            return True

    def pin(self, key: ContentHash) -> None:
        """One more reference from a running request; a KeyError if ``key`` isn't cached."""
        with self._lock:
            if key not in self._entries:
                raise KeyError(f"encoder cache: {key.hex()[:16]} is not cached, so it can't be pinned")
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: ContentHash) -> None:
        """One reference fewer; the last one makes the entry evictable (and evicts down to the
        budget if pinned entries had pushed past it)."""
        with self._lock:
            count = self._pins.get(key, 0)
            if count == 0:
                raise KeyError(f"encoder cache: {key.hex()[:16]} is not pinned")
            if count > 1:
                self._pins[key] = count - 1
                return
            del self._pins[key]
            if self._bytes > self.budget_bytes:
                self._evict(self.budget_bytes)

    def pin_count(self, key: ContentHash) -> int:
        with self._lock:
            return self._pins.get(key, 0)

    def __contains__(self, key: ContentHash) -> bool:  # no hit or miss counted, no LRU update
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[ContentHash]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> EncoderCacheStats:
        with self._lock:
            return EncoderCacheStats(
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                bytes=self._bytes,
                entries=len(self._entries),
                pinned_entries=len(self._pins),
                budget_bytes=self.budget_bytes,
            )

    def clear(self) -> None:
        """Drop every unpinned entry (counters kept)."""
        with self._lock:
            for key in [k for k in self._entries if k not in self._pins]:
                self._drop(key)

    def _evict(self, target_bytes: int) -> None:
        """Evict unpinned entries, least recently used first, until at most ``target_bytes``
        are held or only pinned entries are left."""
        if self._bytes <= target_bytes:
            return
        for key in [k for k in self._entries if k not in self._pins]:
            self._drop(key)
            self.evictions += 1
            if self._bytes <= target_bytes:
                return

    def _drop(self, key: ContentHash) -> None:
        value = self._entries.pop(key)
        self._bytes -= value.numel() * value.element_size()

    def _pinned_bytes(self) -> int:
        return sum(self._entries[k].numel() * self._entries[k].element_size() for k in self._pins)
