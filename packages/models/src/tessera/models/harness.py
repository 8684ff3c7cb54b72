"""Drive a model over a ragged, paged batch without an engine: for tests and for anyone
checking a kernel backend or a new architecture against a reference."""

from __future__ import annotations

import random

import torch

from .attention_metadata import build_attention_metadata
from .kv_cache import LayerKVCache


@torch.inference_mode()
def forward_chunks(
    model,
    chunks: list[list[list[int]]],
    block_size: int = 4,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
    inputs_embeds: list[torch.Tensor | None] | None = None,
    mrope_positions: list[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Run sequences given as lists of chunks; chunk k of every sequence rides in step k, over
    blocks scattered at random in a NaN-filled cache (one block table for every layer). Returns
    each sequence's logits ``[len, V]``.

    ``inputs_embeds``, if given, holds per sequence the embeddings of all its tokens (a
    multimodal prompt's, from ``embed_input_ids``; None: its ids'); each step passes the rows of
    its chunks to ``forward`` instead of ids.

    ``mrope_positions``, if given, holds per sequence the ``[3, len]`` M-RoPE positions of all
    its tokens (None: its ordinary positions in all three rows); each step then passes
    ``[3, T]`` positions."""
    rng = random.Random(seed)
    total = sum(len(t) for seq in chunks for t in seq)
    n_blocks = total // block_size + 4 * len(chunks) + 8
    free = list(range(n_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-sum(map(len, seq)) // block_size))] for seq in chunks]
    kv_dtype = kv_dtype or model.dtype
    cache = [
        LayerKVCache.allocate(
            n_blocks, block_size, s.num_kv_heads, s.head_dim, kv_dtype, model.device, fill=float("nan")
        )
        for s in model.kv_cache_spec()
    ]
    done = [0] * len(chunks)
    logits: list[list[torch.Tensor]] = [[] for _ in chunks]
    for step in range(max(len(s) for s in chunks)):
        parts = [seq[step] if step < len(seq) else [] for seq in chunks]
        ids = [tok for part in parts for tok in part]
        for i, part in enumerate(parts):
            done[i] += len(part)
        positions, metas = build_attention_metadata(
            [len(p) for p in parts], list(done), [tables], block_size, model.device
        )
        ids = torch.tensor(ids, dtype=torch.long, device=model.device)
        if mrope_positions is not None:
            runs = []
            for i, part in enumerate(parts):
                mine = mrope_positions[i]
                if mine is None:
                    mine = torch.arange(done[i]).expand(3, -1)
                runs.append(mine[:, done[i] - len(part) : done[i]])
            positions = torch.cat(runs, dim=1).to(model.device)
        if inputs_embeds is None:
            hidden = model.forward(ids, positions, cache, metas[0])
        else:
            rows = [
                model.embed_input_ids(torch.tensor(part, dtype=torch.long, device=model.device))
                if inputs_embeds[i] is None
                else inputs_embeds[i][done[i] - len(part) : done[i]]
                for i, part in enumerate(parts)
            ]
            hidden = model.forward(ids, positions, cache, metas[0], inputs_embeds=torch.cat(rows))
        out = model.compute_logits(hidden)
        start = 0
        for i, part in enumerate(parts):
            logits[i].append(out[start : start + len(part)])
            start += len(part)
    return [torch.cat(x) for x in logits]
