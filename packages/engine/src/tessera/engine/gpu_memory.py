"""How much GPU memory the KV cache gets: ``--gpu-memory-utilization`` as vLLM means it.

The engine may use ``utilization * total`` bytes of the GPU. The weights are loaded; one forward
of max_num_batched_tokens tokens (the largest step the scheduler makes) plus the logits of
max_num_seqs rows is run on a throwaway cache to measure the activations' peak; what torch does
not account for (the CUDA context, cuBLAS workspaces, other processes) is read from the driver.
The KV cache gets the rest. CUDA graphs are captured after this, from their own pool, and are
not part of the measure (nor are they in vLLM's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.models import CausalLM, LayerKVCache, build_attention_metadata


@dataclass
class MemoryProfile:
    total: int  # the GPU's memory
    peak: int  # torch's peak during the profiled forward: weights + activations
    non_torch: int  # used on the GPU, not by torch's allocator (context, other processes)

    def kv_budget(self, utilization: float) -> int:
        return int(self.total * utilization) - self.peak - self.non_torch

    def explain(self, utilization: float) -> str:
        gib = 2**30
        return (
            f"--gpu-memory-utilization {utilization} allows {self.total * utilization / gib:.2f} GiB of "
            f"the GPU's {self.total / gib:.2f} GiB; the weights and a forward of the largest step "
            f"peak at {self.peak / gib:.2f} GiB and {self.non_torch / gib:.2f} GiB is used outside "
            "torch (CUDA context, other processes)"
        )


def _profile_batch(num_tokens: int, max_len: int) -> list[int]:
    """Sequence lengths of a prefill of ``num_tokens`` tokens, none longer than ``max_len``."""
    full, rest = divmod(num_tokens, max_len)
    return [max_len] * full + ([rest] if rest else [])


def profile_tables(num_tokens: int, max_len: int, block_size: int) -> tuple[list[int], list[list[int]], int]:
    """(sequence lengths, block tables, blocks in all) of a throwaway prefill of ``num_tokens``
    tokens in sequences of at most ``max_len``: each sequence its own consecutive blocks."""
    lens = _profile_batch(num_tokens, max(1, max_len))
    tables, next_block = [], 0
    for n in lens:
        blocks = -(-n // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    return lens, tables, next_block


@torch.inference_mode()
def profile_memory(
    model: CausalLM,
    num_tokens: int,
    num_seqs: int,
    max_len: int,
    block_size: int,
    kv_dtype: torch.dtype,
) -> MemoryProfile:
    """Runs one forward of ``num_tokens`` prompt tokens (sequences of at most ``max_len``) and the
    logits of ``num_seqs`` rows, and measures the memory it needs."""
    device = model.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    lens, tables, next_block = profile_tables(num_tokens, max_len, block_size)
    shapes = {(s.num_kv_heads, s.head_dim) for s in model.kv_cache_spec()}
    if len(shapes) != 1:
        raise ValueError(
            f"layers with different KV shapes (heads, head size) {sorted(shapes)} are not supported"
        )
    ((kv_heads, head_dim),) = shapes
    # one cache every layer writes: the values do not matter, the activations' size does
    cache = LayerKVCache.allocate(next_block, block_size, kv_heads, head_dim, kv_dtype, device)
    cache_bytes = cache.data.nbytes + (cache.scales.nbytes if cache.scales is not None else 0)
    n_layers = len(model.kv_cache_spec())
    positions, metas = build_attention_metadata(lens, lens, [tables], block_size, device)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model.forward(ids, positions, [cache] * n_layers, metas[0])
    logits = model.compute_logits(hidden[-min(num_seqs, num_tokens) :])
    torch.softmax(logits.float(), dim=-1)  # the sampler's float32 probabilities
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - cache_bytes
    del hidden, logits, cache
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    return MemoryProfile(total, peak, max(0, non_torch))


def gpu_kv_cache_budget(
    model: CausalLM,
    utilization: float,
    num_tokens: int,
    num_seqs: int,
    max_len: int,
    block_size: int,
    kv_dtype: torch.dtype,
) -> int:
    """Bytes for the KV cache; refuses, with the numbers, a utilization that leaves none."""
    profile = profile_memory(model, num_tokens, num_seqs, max_len, block_size, kv_dtype)
    budget = profile.kv_budget(utilization)
    if budget <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: {profile.explain(utilization)}; raise "
            "--gpu-memory-utilization or lower --max-num-batched-tokens"
        )
    return budget
