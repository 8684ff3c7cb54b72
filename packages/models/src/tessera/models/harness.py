"""Drive a model over a ragged, paged batch without an engine: for tests and for anyone
checking a kernel backend or a new architecture against a reference."""

from __future__ import annotations

import random

import torch

from .attention_metadata import AttentionMetadata
from .kv_cache import LayerKVCache


@torch.inference_mode()
def forward_chunks(
    model,
    chunks: list[list[list[int]]],
    block_size: int = 4,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Run sequences given as lists of chunks; chunk k of every sequence rides in step k, over
    blocks scattered at random in a NaN-filled cache. Returns each sequence's logits ``[len, V]``."""
    c = model.config
    rng = random.Random(seed)
    total = sum(len(t) for seq in chunks for t in seq)
    n_blocks = total // block_size + 4 * len(chunks) + 8
    free = list(range(n_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-sum(map(len, seq)) // block_size))] for seq in chunks]
    kv_dtype = kv_dtype or model.dtype
    cache = [
        LayerKVCache.allocate(
            n_blocks, block_size, c.num_key_value_heads, c.head_dim, kv_dtype, model.device, fill=float("nan")
        )
        for _ in range(c.num_hidden_layers)
    ]
    done = [0] * len(chunks)
    logits: list[list[torch.Tensor]] = [[] for _ in chunks]
    width = max(1, max(len(t) for t in tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    for step in range(max(len(s) for s in chunks)):
        ids, pos, slots, qsl, lens, counts = [], [], [], [0], [], []
        for i, seq in enumerate(chunks):
            part = seq[step] if step < len(seq) else []
            for k, tok in enumerate(part):
                p = done[i] + k
                ids.append(tok)
                pos.append(p)
                slots.append(tables[i][p // block_size] * block_size + p % block_size)
            done[i] += len(part)
            qsl.append(len(ids))
            lens.append(done[i])
            counts.append(len(part))
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        dev = model.device
        meta = AttentionMetadata(
            torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens.to(dev),
            bt.to(dev),
            torch.tensor(slots, device=dev),
            seq_lens.long().repeat_interleave(torch.tensor(counts)).to(dev),
        )
        hidden = model.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), cache, meta)
        out = model.compute_logits(hidden)
        for i in range(len(chunks)):
            logits[i].append(out[qsl[i] : qsl[i + 1]])
    return [torch.cat(x) for x in logits]
