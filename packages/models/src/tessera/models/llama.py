"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) on a ragged, paged batch.

Differences between the members are config fields: q/k/v (and o) biases, a sliding window,
RoPE scaling, tied embeddings.
"""

from __future__ import annotations

import torch

from tessera.formats import ModelConfig
from tessera.kernels import ops

from .attention_metadata import AttentionMetadata
from .kv_cache import LayerKVCache
from .rotary import RotaryEmbedding


class LlamaAttention:
    def __init__(self, config: ModelConfig, layer: int) -> None:
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        layer_types = config.extra.get("layer_types")
        sliding = layer_types is None or layer_types[layer] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        self.qkv_weight = None  # q, k, v rows stacked: one matmul
        self.qkv_bias: torch.Tensor | None = None
        self.o_weight = None
        self.o_bias: torch.Tensor | None = None

    def forward(self, x, cos, sin, kv_cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = ops.rotary_embedding(q, k, cos, sin, self.head_dim)
        ops.reshape_and_cache(
            k.reshape(t, self.num_kv_heads, self.head_dim),
            v.reshape(t, self.num_kv_heads, self.head_dim),
            kv_cache.data,
            meta.slot_mapping,
            kv_cache.scales,
        )
        out = ops.paged_attention(
            q.reshape(t, self.num_heads, self.head_dim),
            kv_cache.data,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            self.scale,
            self.sliding_window,
            kv_cache.scales,
            batch_invariant=meta.batch_invariant,
        )
        return ops.linear(out.reshape(t, self.q_size), self.o_weight, self.o_bias)


class LlamaMLP:
    def __init__(self) -> None:
        self.gate_up_weight = None  # gate rows then up rows: one matmul
        self.gate_up_bias: torch.Tensor | None = None
        self.down_weight = None
        self.down_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.silu_and_mul(ops.linear(x, self.gate_up_weight, self.gate_up_bias))
        return ops.linear(h, self.down_weight, self.down_bias)


class LlamaDecoderLayer:
    # what a kernel backend's fused ``decoder_layers`` checks before running these layers as a
    # whole (pre-norm RMSNorm, rotary, SiLU-gated MLP); another architecture runs op by op
    layer_kind = "llama"

    def __init__(self, config: ModelConfig, layer: int) -> None:
        self.eps = config.rms_norm_eps
        self.input_norm: torch.Tensor | None = None
        self.post_attention_norm: torch.Tensor | None = None
        self.self_attn = LlamaAttention(config, layer)
        self.mlp = LlamaMLP()

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        if residual is None:
            residual = x
            h = ops.rms_norm(x, self.input_norm, self.eps)
        else:
            h, residual = ops.fused_add_rms_norm(x, residual, self.input_norm, self.eps)
        h = self.self_attn.forward(h, cos, sin, kv_cache, meta)
        h, residual = ops.fused_add_rms_norm(h, residual, self.post_attention_norm, self.eps)
        return self.mlp.forward(h), residual


class LlamaForCausalLM:
    """Weights are filled in by ``tessera.models.load_model``."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.rotary = RotaryEmbedding(config, device)
        self.embed_tokens: torch.Tensor | None = None
        self.layers = [LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm: torch.Tensor | None = None
        self.lm_head = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[LayerKVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of every scheduled token (after the final norm)."""
        cos, sin = self.rotary.cos_sin(positions, meta.token_seq_lens)
        embed = self.embed_tokens
        x = embed[input_ids] if isinstance(embed, torch.Tensor) else embed.rows(input_ids, self.dtype)
        x, residual = ops.decoder_layers(self.layers, x, None, cos, sin, kv_caches, meta)
        x, _ = ops.fused_add_rms_norm(x, residual, self.norm, self.config.rms_norm_eps)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.linear(hidden, self.lm_head, out_dtype=torch.float32)
