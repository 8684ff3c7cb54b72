"""Paged KV-cache bookkeeping over integers: block pool and per-request block tables. No torch."""

from .block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from .kv_cache_manager import KVCacheManager, cdiv
from .memory import kv_bytes_per_token, num_blocks_for_budget

__all__ = [
    "BlockPool",
    "FreeBlockQueue",
    "KVCacheBlock",
    "KVCacheManager",
    "cdiv",
    "kv_bytes_per_token",
    "num_blocks_for_budget",
]
