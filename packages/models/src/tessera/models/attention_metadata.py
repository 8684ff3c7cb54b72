"""What the attention op needs to know about the ragged, paged batch of one step."""

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
    # kernels must give each row the same bits whatever else runs in the step (DESIGN.md,
    # Determinism); False lets a backend pick faster, shape-dependent algorithms
    batch_invariant: bool = True
