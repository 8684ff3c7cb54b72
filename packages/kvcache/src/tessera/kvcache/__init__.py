"""Paged KV-cache bookkeeping over integers: block pool, prefix-cache hashing, KV cache groups
(full and sliding-window layers), per-request block tables, memory planning. No torch."""

from .block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from .kv_cache_groups import KVCacheGroup, KVCacheGroups, KVCacheSpec, cdiv, group_layers
from .kv_cache_manager import PLACEHOLDER_BLOCK_ID, KVCacheManager
from .memory import (
    KV_CACHE_DTYPES,
    QUANTIZED_KV_DTYPES,
    KVDtype,
    kv_bytes_per_token,
    num_blocks_for_budget,
    plan_num_blocks,
)
from .prefix_hash import BlockHash, hash_block, hash_blocks

__all__ = [
    "KV_CACHE_DTYPES",
    "KVDtype",
    "QUANTIZED_KV_DTYPES",
    "PLACEHOLDER_BLOCK_ID",
    "BlockHash",
    "BlockPool",
    "FreeBlockQueue",
    "KVCacheBlock",
    "KVCacheGroup",
    "KVCacheGroups",
    "KVCacheManager",
    "KVCacheSpec",
    "cdiv",
    "group_layers",
    "hash_block",
    "hash_blocks",
    "kv_bytes_per_token",
    "num_blocks_for_budget",
    "plan_num_blocks",
]
