"""Gemma 3 (text): five sliding-window layers per global one, each with its own rope base;
RMSNorm over each head of q and k; norms that scale by ``1 + w`` before and after both the
attention and the MLP; a GELU-tanh gated MLP; embeddings scaled by sqrt(hidden); tied LM head.

Its layers are not of the Llama kind (four norms, QK-norm, GELU), so they run op by op.
"""

from __future__ import annotations

import dataclasses

import torch

from tessera.formats import ModelConfig
from tessera.kernels import ops

from .attention_metadata import AttentionMetadata, per_layer
from .decoder_model import DecoderModel
from .embedding import LMHead, RMSNorm, VocabEmbedding
from .kv_cache import LayerKVCache
from .linear import LoadOptions, MergedColumnParallelLinear, RowParallelLinear
from .llama import LlamaAttention
from .rotary import RotaryEmbedding
from .weight_map import WeightMap


class Gemma3Attention(LlamaAttention):
    """Llama's attention with QK-norm scaling by ``1 + w`` and Gemma's query scale."""

    def __init__(self, config: ModelConfig, layer: int, opts: LoadOptions) -> None:
        super().__init__(config, layer, opts, qk_norm_offset=1.0)
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5


class Gemma3DecoderLayer:
    def __init__(self, config: ModelConfig, layer: int, opts: LoadOptions) -> None:
        c = config
        h, eps = c.hidden_size, c.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.self_attn = Gemma3Attention(c, layer, opts)
        self.gate_up_proj = MergedColumnParallelLinear(h, [c.intermediate_size] * 2, c.mlp_bias, opts.tp)
        self.down_proj = RowParallelLinear(c.intermediate_size, h, c.mlp_bias, opts.tp)

    def finish(self, opts: LoadOptions) -> None:
        for part in (
            self.input_layernorm,
            self.post_attention_layernorm,
            self.pre_feedforward_layernorm,
            self.post_feedforward_layernorm,
            self.self_attn,
        ):
            part.finish(opts)
        self.gate_up_proj.finish(opts)
        self.down_proj.finish(opts)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """``x`` is the last layer's output not yet added to ``residual`` (None at the start)."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.post_attention_layernorm.forward(self.self_attn.forward(h, cos, sin, kv_cache, meta))
        h, residual = self.pre_feedforward_layernorm.add_forward(h, residual)
        h = self.down_proj.forward(ops.gelu_tanh_and_mul(self.gate_up_proj.forward(h)))
        return self.post_feedforward_layernorm.forward(h), residual


class Gemma3ForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig, opts: LoadOptions) -> None:
        c = config
        if c.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"Gemma 3 uses gelu_pytorch_tanh, the config says {c.hidden_act}")
        self.config, self.opts = c, opts
        self.dtype, self.device = opts.dtype, opts.device
        self.rotary_global = RotaryEmbedding(c, opts.device)
        local = dataclasses.replace(c, rope_theta=c.rope_local_theta or c.rope_theta, rope_scaling=None)
        self.rotary_local = RotaryEmbedding(local, opts.device)
        self.embed_tokens = VocabEmbedding(c.vocab_size, c.hidden_size, opts.tp)
        self.layers = [Gemma3DecoderLayer(c, i, opts) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, offset=1.0)
        self.lm_head = LMHead(self.embed_tokens, c.tie_word_embeddings)
        self.embed_scale = c.hidden_size**0.5

    def weight_map(self) -> WeightMap:
        c = self.config
        wm = WeightMap(c.architecture)
        e = self.embed_tokens
        wm.add(e.weight_shape(), e.load_weight, "model.embed_tokens.weight", "token_embd.weight")

        def norm(n: RMSNorm, hf: str, gguf: str) -> None:
            wm.add_norm(n, hf, gguf, gguf_load=n.load_weight_with_offset)

        norm(self.norm, "model.norm", "output_norm")
        if c.tie_word_embeddings:
            wm.ignore(r"lm_head\.weight|output\.weight")
        else:
            wm.add(e.weight_shape(), self.lm_head.load_weight, "lm_head.weight", "output.weight")
        for i, layer in enumerate(self.layers):
            hf, gguf = f"model.layers.{i}", f"blk.{i}"
            a = layer.self_attn
            norm(layer.input_layernorm, f"{hf}.input_layernorm", f"{gguf}.attn_norm")
            norm(
                layer.post_attention_layernorm,
                f"{hf}.post_attention_layernorm",
                f"{gguf}.post_attention_norm",
            )
            norm(layer.pre_feedforward_layernorm, f"{hf}.pre_feedforward_layernorm", f"{gguf}.ffn_norm")
            norm(
                layer.post_feedforward_layernorm, f"{hf}.post_feedforward_layernorm", f"{gguf}.post_ffw_norm"
            )
            norm(a.q_norm, f"{hf}.self_attn.q_norm", f"{gguf}.attn_q_norm")
            norm(a.k_norm, f"{hf}.self_attn.k_norm", f"{gguf}.attn_k_norm")
            for x in "qkv":
                wm.add_linear(a.qkv_proj, f"{hf}.self_attn.{x}_proj", f"{gguf}.attn_{x}", x)
            wm.add_linear(a.o_proj, f"{hf}.self_attn.o_proj", f"{gguf}.attn_output")
            wm.add_linear(layer.gate_up_proj, f"{hf}.mlp.gate_proj", f"{gguf}.ffn_gate", 0)
            wm.add_linear(layer.gate_up_proj, f"{hf}.mlp.up_proj", f"{gguf}.ffn_up", 1)
            wm.add_linear(layer.down_proj, f"{hf}.mlp.down_proj", f"{gguf}.ffn_down")
        return wm

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens.forward(input_ids, self.dtype)
        # HF scales in the embedding's dtype: sqrt(hidden) rounded to it first
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[LayerKVCache],
        attn_metadata: AttentionMetadata | list[AttentionMetadata],
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        metas = per_layer(attn_metadata, len(self.layers))
        seq_lens = metas[0].token_seq_lens
        global_cs = self.rotary_global.cos_sin(positions, seq_lens)
        local_cs = self.rotary_local.cos_sin(positions, seq_lens)
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer, cache, meta in zip(self.layers, kv_caches, metas, strict=True):
            cos, sin = local_cs if layer.self_attn.sliding_window is not None else global_cs
            x, residual = layer.forward(x, residual, cos, sin, cache, meta)
        x, _ = self.norm.add_forward(x, residual)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.forward(hidden)
        cap = self.config.final_logit_softcapping
        return self.lm_head.expand(logits if cap is None else torch.tanh(logits / cap) * cap)
