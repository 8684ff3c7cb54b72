"""How many KV blocks fit in a byte budget."""

from __future__ import annotations


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one token in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    return budget_bytes // (block_size * bytes_per_token)
