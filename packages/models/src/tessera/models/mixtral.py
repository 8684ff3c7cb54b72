"""Mixtral: Llama's attention, and a sparse mixture-of-experts MLP (``moe.FusedMoE``: each
token's top 2 of 8 SiLU-gated experts, their weights renormalized).

``ops.decoder_layers`` takes dense Llama-kind layers only, so these layers run op by op. The
attention, layer and model here serve the Qwen MoE families too (``qwen_moe.py``), which
differ in their MLP blocks, qkv bias and QK-norm.
"""

from __future__ import annotations

import torch

from tessera.formats import ModelConfig
from tessera.kernels import DecoderLayerSpec, MoEWeights, ops

from .attention_metadata import AttentionMetadata, per_layer
from .decoder_model import DecoderModel
from .embedding import LMHead, RMSNorm, VocabEmbedding
from .kv_cache import LayerKVCache
from .linear import LoadOptions
from .llama import IGNORED, LlamaAttention
from .moe import FusedMoE
from .rotary import RotaryEmbedding
from .weight_map import WeightMap


class MoEAttention(LlamaAttention):
    """Llama's attention run op by op, with an RMSNorm over each head of q and k before the
    rotary embedding where the config has QK-norm (Qwen3-MoE: a plain ``w * x / rms(x)``)."""

    def declare(self, wm: WeightMap, hf: str, gguf: str, permuted_heads: tuple[int, int] | None) -> None:
        super().declare(wm, hf, gguf, permuted_heads)
        if self.q_norm is not None:
            wm.add_norm(self.q_norm, f"{hf}.self_attn.q_norm", f"{gguf}.attn_q_norm")
            wm.add_norm(self.k_norm, f"{hf}.self_attn.k_norm", f"{gguf}.attn_k_norm")


class MoEDecoderLayer:
    """Pre-norm attention, then a pre-norm MLP block: ``mlp`` is anything with ``finish`` and
    ``forward`` (experts, experts with a shared expert, or a dense MLP)."""

    def __init__(self, config: ModelConfig, layer: int, opts: LoadOptions, mlp) -> None:
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MoEAttention(c, layer, opts)
        self.mlp = mlp

    def finish(self, opts: LoadOptions) -> None:
        self.input_layernorm.finish(opts)
        self.post_attention_layernorm.finish(opts)
        self.self_attn.finish(opts)
        self.mlp.finish(opts)

    def describe(self) -> DecoderLayerSpec:
        """The layer for ``ops.decoder_layers``: Llama's, with the experts as its MLP (only for
        plain routed experts and no QK-norm: what the spec describes)."""
        a, m = self.self_attn, self.mlp
        return DecoderLayerSpec(
            input_norm=self.input_layernorm.weight,
            post_attention_norm=self.post_attention_layernorm.weight,
            qkv=a.qkv_proj.describe(),
            o=a.o_proj.describe(),
            gate_up=None,
            down=None,
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            scale=a.scale,
            eps=self.input_layernorm.eps,
            sliding_window=a.sliding_window,
            tp_size=a.o_proj.tp.size,
            moe=MoEWeights(m.router.weight, m.gate_up, m.down, m.top_k, m.renormalize),
        )

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """``x`` is the last layer's output not yet added to ``residual`` (None at the start)."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn.forward(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp.forward(h), residual


class MixtralForCausalLM(DecoderModel):
    # llama.cpp converts Mixtral as "llama", interleaving the rotary halves of q/k rows
    rope_rows_permuted = True

    def __init__(self, config: ModelConfig, opts: LoadOptions) -> None:
        c = config
        self.config, self.opts = c, opts
        self.dtype, self.device = opts.dtype, opts.device
        self.rotary = RotaryEmbedding(c, opts.device)
        self.embed_tokens = VocabEmbedding(c.vocab_size, c.hidden_size, opts.tp)
        self.layers = [MoEDecoderLayer(c, i, opts, self.make_mlp(i)) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = LMHead(self.embed_tokens, c.tie_word_embeddings)
        self.layer_specs: list[DecoderLayerSpec] = []

    # -- what the families differ in: the MLP block and its names ---------------------------

    def make_mlp(self, layer: int):
        c = self.config
        return FusedMoE(
            c.hidden_size,
            c.moe_intermediate_size,
            c.num_experts,
            c.num_experts_per_tok,
            c.norm_topk_prob,
            self.opts.tp,
        )

    def declare_mlp(self, wm: WeightMap, mlp, hf: str, gguf: str) -> None:
        # transformers 5 holds the block under ``mlp`` (its own fused names use that prefix)
        mlp.declare(wm, f"{hf}.block_sparse_moe", gguf, ("w1", "w3", "w2"), fused_hf=f"{hf}.mlp")

    # -- loading ----------------------------------------------------------------------------

    def weight_map(self) -> WeightMap:
        c = self.config
        wm = WeightMap(c.architecture)
        e = self.embed_tokens
        wm.add(e.weight_shape(), e.load_weight, "model.embed_tokens.weight", "token_embd.weight")
        wm.add_norm(self.norm, "model.norm", "output_norm")
        if c.tie_word_embeddings:
            wm.ignore(r"lm_head\.weight|output\.weight")
        else:
            wm.add(e.weight_shape(), self.lm_head.load_weight, "lm_head.weight", "output.weight")
        wm.add(
            (c.head_dim // 2,),
            self.rotary.set_freq_factors,
            "model.rotary_emb.freq_factors",
            "rope_freqs.weight",
            required=False,
        )
        wm.ignore(IGNORED)
        permuted = (c.num_attention_heads, c.num_key_value_heads) if self.rope_rows_permuted else None
        for i, layer in enumerate(self.layers):
            hf, gguf = f"model.layers.{i}", f"blk.{i}"
            wm.add_norm(layer.input_layernorm, f"{hf}.input_layernorm", f"{gguf}.attn_norm")
            wm.add_norm(layer.post_attention_layernorm, f"{hf}.post_attention_layernorm", f"{gguf}.ffn_norm")
            layer.self_attn.declare(wm, hf, gguf, permuted)
            self.declare_mlp(wm, layer.mlp, hf, gguf)
        return wm

    def loaded(self) -> None:
        # whole layers for the kernels where the spec describes them (plain routed experts, no
        # QK-norm): a backend may run the stack fused
        c = self.config
        plain = all(type(ly.mlp) is FusedMoE for ly in self.layers)
        if plain and not c.qk_norm:
            self.layer_specs = [layer.describe() for layer in self.layers]

    # -- the contract -----------------------------------------------------------------------

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
        cos, sin = self.rotary.cos_sin(positions, metas[0].token_seq_lens)
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        if self.layer_specs:
            x, residual = ops.decoder_layers(self.layer_specs, x, None, cos, sin, kv_caches, metas)
        else:
            residual = None
            for layer, cache, meta in zip(self.layers, kv_caches, metas, strict=True):
                x, residual = layer.forward(x, residual, cos, sin, cache, meta)
        x, _ = self.norm.add_forward(x, residual)
        return x
