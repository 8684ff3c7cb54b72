"""Persistent device tensors for one step's inputs, filled from pinned host mirrors.

The GPU runner allocates these once (sized for max_num_batched_tokens, max_num_seqs and the
longest block table) and, each step, writes the step's ids, positions and attention metadata on
the host, then copies them with one non-blocking copy per buffer. The tensors handed to the
model are views of the device buffers, so a CUDA graph captured over them sees each step's
values at the same addresses. The values are those of ``build_attention_metadata`` for the
same lists (the tests compare them).
"""

from __future__ import annotations

import numpy as np
import torch

from tessera.models import AttentionMetadata


class InputBuffers:
    def __init__(
        self,
        max_tokens: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        num_groups: int,
        block_size: int,
        device: torch.device | str,
        graph_rows: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.max_blocks = max_blocks_per_seq
        self.block_size = block_size
        pin = self.device.type == "cuda"

        def pair(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.zeros(n, dtype=dtype, pin_memory=pin),
                torch.zeros(n, dtype=dtype, device=self.device),
            )

        self.ids = pair(max_tokens, torch.int64)
        self.positions = pair(max_tokens, torch.int64)
        self.token_seq_lens = pair(max_tokens, torch.int64)
        self.slots = [pair(max_tokens, torch.int64) for _ in range(num_groups)]
        self.query_start_loc = pair(max_seqs + 1, torch.int32)
        self.seq_lens = pair(max_seqs, torch.int32)
        # compact: a step's table is [B, W] with W its widest row, so only B * W ints cross
        self.tables = [pair(max_seqs * max_blocks_per_seq, torch.int32) for _ in range(num_groups)]
        # the fixed-width tables a CUDA graph reads (it captured their strides)
        self.wide_tables = [
            torch.zeros(graph_rows, max_blocks_per_seq, dtype=torch.int32, device=self.device)
            for _ in range(num_groups if graph_rows else 0)
        ]
        # set after each step's copies: the host mirrors are rewritten only once they are read
        self._copied = torch.cuda.Event() if pin else None
        self._widths = [1] * num_groups

    def fits(self, num_tokens: int, num_seqs: int, widest_table: int) -> bool:
        return num_tokens <= self.max_tokens and num_seqs <= self.max_seqs and widest_table <= self.max_blocks

    def fill(
        self,
        ids: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[list[int]]],
        batch_invariant: bool = True,
        wide: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata]]:
        """Input ids ``[T]``, positions ``[T]`` and one AttentionMetadata per KV cache group, as
        ``build_attention_metadata(query_lens, seq_lens, block_tables, ...)`` gives them (the
        lists must fit: see ``fits``). ``wide``: also copy the tables into the graph's
        fixed-width tables, which the returned metadata then use."""
        b, t = len(query_lens), len(ids)
        if self._copied is not None:
            self._copied.synchronize()
        counts = np.asarray(query_lens, dtype=np.int64)
        lens = np.asarray(seq_lens, dtype=np.int64)
        qsl = self.query_start_loc[0].numpy()
        qsl[0] = 0
        qsl[1 : b + 1] = np.cumsum(counts)
        seq_of_token = np.repeat(np.arange(b), counts)
        # each token's offset in its query run, after the run's first position
        pos = self.positions[0].numpy()[:t]
        pos[:] = np.arange(t) - qsl[:b][seq_of_token] + (lens - counts)[seq_of_token]
        self.ids[0].numpy()[:t] = ids
        self.token_seq_lens[0].numpy()[:t] = lens[seq_of_token]
        self.seq_lens[0].numpy()[:b] = lens
        for g, tables in enumerate(block_tables):
            width = max(1, max((len(row) for row in tables), default=1))
            table = self.tables[g][0].numpy()[: b * width].reshape(b, width)
            table.fill(0)
            for i, row in enumerate(tables):
                table[i, : len(row)] = row
            blocks = table[seq_of_token, pos // self.block_size].astype(np.int64)
            self.slots[g][0].numpy()[:t] = blocks * self.block_size + pos % self.block_size
            self._widths[g] = width
        for host, dev in (self.ids, self.positions, self.token_seq_lens, *self.slots):
            dev[:t].copy_(host[:t], non_blocking=True)
        self.query_start_loc[1][: b + 1].copy_(self.query_start_loc[0][: b + 1], non_blocking=True)
        self.seq_lens[1][:b].copy_(self.seq_lens[0][:b], non_blocking=True)
        for (host, dev), width in zip(self.tables, self._widths, strict=True):
            dev[: b * width].copy_(host[: b * width], non_blocking=True)
        if wide:
            for (_, dev), table, width in zip(self.tables, self.wide_tables, self._widths, strict=True):
                table[:b, :width].copy_(dev[: b * width].view(b, width))
        if self._copied is not None:
            self._copied.record()
        return self.views(
            t, b, batch_invariant, max(query_lens, default=0), max(seq_lens, default=0), wide=wide
        )

    def views(
        self,
        num_tokens: int,
        num_seqs: int,
        batch_invariant: bool,
        max_query_len: int,
        max_seq_len: int,
        wide: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata]]:
        """The device buffers' first rows as a step's inputs; with ``wide``, the block tables
        are the graph's fixed-width ones. Copies nothing (safe inside a graph capture)."""
        t, b = num_tokens, num_seqs
        common = {
            "query_start_loc": self.query_start_loc[1][: b + 1],
            "seq_lens": self.seq_lens[1][:b],
            "token_seq_lens": self.token_seq_lens[1][:t],
            "max_query_len": max_query_len,
            "max_seq_len": max_seq_len,
            "batch_invariant": batch_invariant,
        }
        metas = []
        for g, (_, slots) in enumerate(self.slots):
            if wide:
                table = self.wide_tables[g][:b]
            else:
                width = self._widths[g]
                table = self.tables[g][1][: b * width].view(b, width)
            metas.append(AttentionMetadata(block_tables=table, slot_mapping=slots[:t], **common))
        return self.ids[1][:t], self.positions[1][:t], metas
