"""What the attention op needs to know about the ragged, paged batch of one step, and the one
place it is built from plain lists."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int32: sequence i's tokens are [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # [B] int32: tokens of sequence i once this step is done
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V goes
    token_seq_lens: torch.Tensor  # [T] int64: seq_lens of each token's sequence (dynamic RoPE)
    # host ints for the grids of varlen kernels, known without a device sync; an upper bound (a
    # CUDA graph captured for decode holds max_model_len), so kernels still mask by seq_lens
    max_query_len: int
    max_seq_len: int
    # kernels must give each row the same bits whatever else runs in the step (DESIGN.md,
    # Determinism); False lets a backend pick faster, shape-dependent algorithms
    batch_invariant: bool = True


def per_layer(meta: AttentionMetadata | list[AttentionMetadata], n_layers: int) -> list[AttentionMetadata]:
    """One metadata per layer: as given, or the one given for every layer."""
    if isinstance(meta, AttentionMetadata):
        return [meta] * n_layers
    if len(meta) != n_layers:
        raise ValueError(f"{len(meta)} attention metadata for {n_layers} layers")
    return list(meta)


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[list[int]]],
    block_size: int,
    device: torch.device,
    batch_invariant: bool = True,
) -> tuple[torch.Tensor, list[AttentionMetadata]]:
    """Positions ``[T]`` of the step's tokens and one AttentionMetadata per KV cache group.

    Sequence i computes its last ``query_lens[i]`` tokens of ``seq_lens[i]``;
    ``block_tables[g][i]`` is its block table in group g (token p's slot is
    ``table[p // block_size] * block_size + p % block_size``).
    """
    counts = torch.tensor(query_lens, dtype=torch.int64)
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), counts)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(counts, 0)
    # position of each token: its offset in its query run, after the run's first position
    offsets = torch.arange(int(qsl[-1])) - qsl[:-1].long()[seq_of_token]
    positions = (lens - counts)[seq_of_token] + offsets
    common = {
        "query_start_loc": qsl.to(device),
        "seq_lens": lens.to(torch.int32).to(device),
        "token_seq_lens": lens[seq_of_token].to(device),
        "max_query_len": max(query_lens, default=0),
        "max_seq_len": max(seq_lens, default=0),
        "batch_invariant": batch_invariant,
    }
    metas = []
    for tables in block_tables:
        width = max(1, max((len(t) for t in tables), default=1))
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        blocks = table.long()[seq_of_token, positions // block_size]
        slots = blocks * block_size + positions % block_size
        metas.append(
            AttentionMetadata(block_tables=table.to(device), slot_mapping=slots.to(device), **common)
        )
    return positions.to(device), metas
