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


@reference("gelu_tanh_and_mul")
def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` where x is ``[..., 2*I]`` = gate then up (Gemma's MLP)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


@reference("prepare_linear_weight")
def prepare_linear_weight(weight, dtype: torch.dtype):
    """What ``linear`` will multiply with, made once at load from a packed checkpoint weight
    (an object with ``dequantize(dtype)``): here, the dequantized tensor. Backends may keep the
    packed bytes in a layout of their own instead."""
    return weight.dequantize(dtype)


@reference("linear")
def linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x @ W.T + b``; ``weight`` is a tensor or a packed weight with ``dequantize(dtype)``
    (a ``RowStack`` too). The result is in ``out_dtype`` (default: x's); a backend may skip
    the rounding to x's dtype in between (the LM head's logits in fp32 from bf16 inputs)."""
    w = weight if isinstance(weight, torch.Tensor) else weight.dequantize(x.dtype)
    out = F.linear(x, w, bias)
    return out if out_dtype is None else out.to(out_dtype)


# Quantized KV storage: one float32 scale per (token, head) for K and for V.
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[T, Hk, D]`` -> (values of ``dtype``, scales ``[T, Hk]``) with x ~= values * scale."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-8)
    if dtype == torch.int8:
        scale = amax / INT8_MAX
        q = torch.round(x.float() / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        scale = amax / FP8_E4M3_MAX
        q = (x.float() / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return q, scale


def is_quantized_kv(dtype: torch.dtype) -> bool:
    return dtype in (torch.int8, torch.float8_e4m3fn)


@reference("reshape_and_cache")
def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Write key/value ``[T, Hk, D]`` into their slots (``block_id * block_size + offset``).

    For an int8 or fp8 cache, ``kv_scales`` ``[2, num_blocks, block_size, Hk]`` receives each
    token's per-head scales.
    """
    _, nb, bs, hk, d = kv_cache.shape
    flat = kv_cache.view(2, nb * bs, hk, d)
    if is_quantized_kv(kv_cache.dtype):
        scales = kv_scales.view(2, nb * bs, hk)
        for i, x in enumerate((key, value)):
            q, s = quantize_kv(x, kv_cache.dtype)
            flat[i][slot_mapping] = q
            scales[i][slot_mapping] = s
    else:
        flat[0][slot_mapping] = key.to(kv_cache.dtype)
        flat[1][slot_mapping] = value.to(kv_cache.dtype)


def gather_kv(
    kv_cache: torch.Tensor,
    kv_scales: torch.Tensor | None,
    table_row: torch.Tensor,
    lo: int,
    hi: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions ``lo..hi-1`` of one sequence as ``[hi - lo, Hk, D]`` of ``dtype``,
    dequantized; reads only the blocks that hold them."""
    bs, hk, d = kv_cache.shape[2], kv_cache.shape[3], kv_cache.shape[4]
    b0, b1 = lo // bs, (hi + bs - 1) // bs
    blocks = table_row[b0:b1].long()
    rows = slice(lo - b0 * bs, hi - b0 * bs)
    k = kv_cache[0, blocks].reshape(-1, hk, d)[rows]
    v = kv_cache[1, blocks].reshape(-1, hk, d)[rows]
    if is_quantized_kv(kv_cache.dtype):
        k = k.float() * kv_scales[0, blocks].reshape(-1, hk)[rows][..., None]
        v = v.float() * kv_scales[1, blocks].reshape(-1, hk)[rows][..., None]
    return k.to(dtype), v.to(dtype)


@reference("paged_attention")
def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    kv_scales: torch.Tensor | None = None,
    batch_invariant: bool = True,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch over the paged cache, prefill and decode alike.

    Sequence i owns queries ``query_start_loc[i]:query_start_loc[i+1]``, which are its last
    tokens: its total length (cached + new) is ``seq_lens[i]``. With a sliding window W a query
    at position p sees keys at positions ``p - W < j <= p``. Only slots a query can see are
    read (blocks out of every query's window may have been given back).

    ``batch_invariant``: a query row's output must not depend on the other rows of the step
    (their number, how its own run is chunked, prefill or decode). A backend may give that up
    for speed when it is False; this reference ignores it.

    ``max_query_len`` / ``max_seq_len``: host-side upper bounds of the query runs and of
    ``seq_lens`` (from the metadata builder, so a GPU kernel sizes its grid without reading the
    device; inside a CUDA graph they are the captured bounds, not this step's). Optional; this
    reference reads the lengths themselves.
    """
    t, hq, d = query.shape
    hk = kv_cache.shape[3]
    out = torch.empty_like(query)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        if q1 == q0:
            continue
        first_q = seq_len - (q1 - q0)
        lo = 0 if sliding_window is None else max(0, first_q - sliding_window + 1)
        k, v = gather_kv(kv_cache, kv_scales, block_tables[i], lo, seq_len)
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
        q = query[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(first_q, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(lo, seq_len, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out


@reference("decoder_layers")
def decoder_layers(layers, x, residual, cos, sin, kv_caches, attn_metadata):
    """A stack of ``DecoderLayerSpec`` layers, op by op; ``attn_metadata`` is one
    AttentionMetadata per layer. Returns ``(x, residual)`` where the caller adds and norms last.
    A backend may run the stack fused, with the same ops in the same order. Tensor-parallel
    layers (``tp_size`` > 1) sum o's and the MLP's partial outputs across the ranks."""
    from . import ops  # ops imports this module

    for ly, cache, meta in zip(layers, kv_caches, attn_metadata, strict=True):
        if residual is None:
            residual = x
            h = ops.rms_norm(x, ly.input_norm, ly.eps)
        else:
            h, residual = ops.fused_add_rms_norm(x, residual, ly.input_norm, ly.eps)
        t = h.shape[0]
        q_size, kv_size = ly.num_heads * ly.head_dim, ly.num_kv_heads * ly.head_dim
        qkv = ops.linear(h, ly.qkv.weight, ly.qkv.bias)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = ops.rotary_embedding(q, k, cos, sin, ly.head_dim)
        k = k.reshape(t, ly.num_kv_heads, ly.head_dim)
        ops.reshape_and_cache(
            k, v.reshape(t, ly.num_kv_heads, ly.head_dim), cache.data, meta.slot_mapping, cache.scales
        )
        out = ops.paged_attention(
            q.reshape(t, ly.num_heads, ly.head_dim),
            cache.data,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            ly.scale,
            ly.sliding_window,
            cache.scales,
            batch_invariant=meta.batch_invariant,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
        )
        h = ops.linear(out.reshape(t, q_size), ly.o.weight, ly.o.bias)
        if ly.tp_size > 1:
            ops.all_reduce(h)
        h, residual = ops.fused_add_rms_norm(h, residual, ly.post_attention_norm, ly.eps)
        if ly.moe is not None:
            m = ly.moe
            logits = ops.linear(h, m.router, out_dtype=torch.float32)
            x = ops.fused_moe(h, logits, m.gate_up, m.down, m.top_k, m.renormalize)
        else:
            x = ops.linear(
                ops.silu_and_mul(ops.linear(h, ly.gate_up.weight, ly.gate_up.bias)),
                ly.down.weight,
                ly.down.bias,
            )
        if ly.tp_size > 1:
            ops.all_reduce(x)
    return x, residual
