"""The torch reference of every op: the spec that backends are tested against.

Shapes: T is the number of tokens in the ragged batch, B the number of sequences, Hq/Hk the
query/KV head counts, D the head size. A KV cache is ``[2, num_blocks, block_size, Hk, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import reference


@reference("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@reference("fused_add_rms_norm")
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` normalized; returns (normalized, the new residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


@reference("rotary_embedding")
def rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (NeoX) RoPE. query ``[T, Hq*D]``, key ``[T, Hk*D]``, cos/sin ``[T, D/2]``."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        x = x.view(t, -1, head_dim)
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).view(t, -1)

    return rotate(query), rotate(key)


@reference("silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where x is ``[..., 2*I]`` = gate then up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@reference("linear")
def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b``; ``weight`` is a tensor or a packed weight with ``dequantize(dtype)``."""
    w = weight if isinstance(weight, torch.Tensor) else weight.dequantize(x.dtype)
    return F.linear(x, w, bias)


@reference("reshape_and_cache")
def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write key/value ``[T, Hk, D]`` into their slots (``block_id * block_size + offset``)."""
    _, nb, bs, hk, d = kv_cache.shape
    kv_cache[0].view(nb * bs, hk, d)[slot_mapping] = key.to(kv_cache.dtype)
    kv_cache[1].view(nb * bs, hk, d)[slot_mapping] = value.to(kv_cache.dtype)


@reference("paged_attention")
def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch over the paged cache, prefill and decode alike.

    Sequence i owns queries ``query_start_loc[i]:query_start_loc[i+1]``, which are its last
    tokens: its total length (cached + new) is ``seq_lens[i]``. With a sliding window W a query
    at position p sees keys at positions ``p - W < j <= p``.
    """
    t, hq, d = query.shape
    hk, bs = kv_cache.shape[3], kv_cache.shape[2]
    out = torch.empty_like(query)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        if q1 == q0:
            continue
        n_blocks = (seq_len + bs - 1) // bs
        blocks = block_tables[i, :n_blocks].long()
        k = kv_cache[0, blocks].reshape(-1, hk, d)[:seq_len].float()
        v = kv_cache[1, blocks].reshape(-1, hk, d)[:seq_len].float()
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
        q = query[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
