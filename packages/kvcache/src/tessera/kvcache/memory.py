"""How many KV blocks fit in a byte budget."""

from __future__ import annotations

# storage dtype name -> (bytes per element, bytes of scale per token per head per K/V)
KV_CACHE_DTYPES = {
    "float32": (4, 0),
    "float16": (2, 0),
    "bfloat16": (2, 0),
    "int8": (1, 4),  # float32 scale per token and head
    "fp8": (1, 4),  # float8 e4m3 with a float32 scale per token and head
}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str | int) -> int:
    """K and V of one token in every layer, scales included. ``dtype`` is a name of
    KV_CACHE_DTYPES or a plain element size in bytes."""
    if isinstance(dtype, int):
        elem, scale = dtype, 0
    else:
        if dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache dtype {dtype!r} (known: {', '.join(KV_CACHE_DTYPES)})")
        elem, scale = KV_CACHE_DTYPES[dtype]
    return 2 * num_layers * num_kv_heads * (head_dim * elem + scale)


def num_blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    return budget_bytes // (block_size * bytes_per_token)


def plan_num_blocks(budget_bytes: int, block_size: int, bytes_per_token: int, max_model_len: int) -> int:
    """Blocks for ``budget_bytes``; refuses, with the numbers, a budget that can't hold one request
    of ``max_model_len`` tokens."""
    num_blocks = num_blocks_for_budget(budget_bytes, block_size, bytes_per_token)
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        need_mib = -(-max_model_len // block_size) * block_size * bytes_per_token / 2**20
        raise ValueError(
            f"the KV cache ({budget_bytes / 2**20:.1f} MiB = {num_blocks} blocks of {block_size} tokens "
            f"at {bytes_per_token} bytes per token = {capacity} tokens) cannot hold one request of "
            f"max_model_len {max_model_len} ({need_mib:.1f} MiB); give more KV cache memory or a "
            "smaller max_model_len"
        )
    return num_blocks
