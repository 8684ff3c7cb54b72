"""How many KV blocks fit in a byte budget."""

from __future__ import annotations

from typing import NamedTuple


class KVDtype(NamedTuple):
    element_bytes: int
    scale_bytes: int  # per token, head and K/V (a float32 scale where stored quantized)
    torch_name: str  # the torch dtype that holds it


# The one table of KV storage dtypes: names as --kv-cache-dtype takes them (and torch's names of
# the float ones, which "auto" resolves to)
KV_CACHE_DTYPES = {
    "float32": KVDtype(4, 0, "float32"),
    "float16": KVDtype(2, 0, "float16"),
    "bfloat16": KVDtype(2, 0, "bfloat16"),
    "int8": KVDtype(1, 4, "int8"),
    "fp8": KVDtype(1, 4, "float8_e4m3fn"),  # e4m3
}
QUANTIZED_KV_DTYPES = tuple(name for name, d in KV_CACHE_DTYPES.items() if d.scale_bytes)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str | int) -> int:
    """K and V of one token in every layer, scales included. ``dtype`` is a name of
    KV_CACHE_DTYPES or a plain element size in bytes."""
    if isinstance(dtype, int):
        elem, scale = dtype, 0
    else:
        if dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache dtype {dtype!r} (known: {', '.join(KV_CACHE_DTYPES)})")
        elem, scale, _ = KV_CACHE_DTYPES[dtype]
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
