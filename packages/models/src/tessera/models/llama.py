"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) on a ragged, paged batch.

Differences between the members are config fields: q/k/v (and o) biases, a sliding window,
RoPE scaling, tied embeddings. The layers are pre-norm with a SiLU-gated MLP, so the whole
stack is handed to ``ops.decoder_layers`` as ``DecoderLayerSpec``s (a backend may fuse it).
"""

from __future__ import annotations

import torch

from tessera.formats import ModelConfig, QuantizedTensor
from tessera.kernels import DecoderLayerSpec, ops

from .attention_metadata import AttentionMetadata, per_layer
from .decoder_model import DecoderModel
from .embedding import LMHead, RMSNorm, VocabEmbedding
from .kv_cache import LayerKVCache
from .linear import LoadOptions, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from .rotary import RotaryEmbedding
from .weight_map import WeightMap

# tensors some checkpoints carry that we recompute
IGNORED = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"


def unpermute_rope_rows(rows, n_heads: int):
    """Undo llama.cpp's converter, which interleaves each head's rotary halves row-wise (for
    the architectures it converts as Llama). It maps HF row ``(h, j, i)`` (half j, index i) to
    ``(h, i, j)``; we map back. Whole rows move, so packed rows do too."""
    data = rows.data.reshape(rows.shape[0], -1) if isinstance(rows, QuantizedTensor) else rows
    out = data.shape[0]
    per_half = out // n_heads // 2
    data = data.reshape(n_heads, per_half, 2, *data.shape[1:]).transpose(1, 2).reshape(data.shape)
    return QuantizedTensor(rows.scheme, data, rows.shape) if isinstance(rows, QuantizedTensor) else data


class LlamaAttention:
    """q|k|v in one matmul, rotary, the paged cache, o. In a Llama model the fused stack (or the
    reference ``decoder_layers``) runs it from its DecoderLayerSpec; other families run
    ``forward`` op by op, with an RMSNorm over each head of q and k where the config has QK-norm
    (``qk_norm_offset`` 1 for Gemma's ``1 + w``)."""

    def __init__(
        self, config: ModelConfig, layer: int, opts: LoadOptions, qk_norm_offset: float = 0.0
    ) -> None:
        c = config
        self.qkv_proj = QKVParallelLinear(
            c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.qkv_bias, opts.tp
        )
        self.o_proj = RowParallelLinear(c.q_size, c.hidden_size, c.o_bias, opts.tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = c.head_dim
        self.scale = c.head_dim**-0.5
        self.sliding_window = c.layer_window(layer)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, qk_norm_offset) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, qk_norm_offset) if c.qk_norm else None

    def finish(self, opts: LoadOptions) -> None:
        for part in (self.qkv_proj, self.o_proj, self.q_norm, self.k_norm):
            if part is not None:
                part.finish(opts)

    def forward(self, x, cos, sin, kv_cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv_proj.forward(x)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm.forward(q.reshape(-1, d)).reshape(t, -1)
            k = self.k_norm.forward(k.reshape(-1, d)).reshape(t, -1)
        q, k = ops.rotary_embedding(q, k, cos, sin, d)
        ops.reshape_and_cache(
            k.reshape(t, self.num_kv_heads, d),
            v.reshape(t, self.num_kv_heads, d),
            kv_cache.data,
            meta.slot_mapping,
            kv_cache.scales,
        )
        out = ops.paged_attention(
            q.reshape(t, self.num_heads, d),
            kv_cache.data,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            self.scale,
            self.sliding_window,
            kv_cache.scales,
            batch_invariant=meta.batch_invariant,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
        )
        return self.o_proj.forward(out.reshape(t, self.num_heads * d))

    def declare(self, wm: WeightMap, hf: str, gguf: str, permuted_heads: tuple[int, int] | None) -> None:
        for x in "qkv":
            fix = None
            if permuted_heads is not None and x in "qk":
                n = permuted_heads[0] if x == "q" else permuted_heads[1]
                fix = lambda t, n=n: unpermute_rope_rows(t, n)  # noqa: E731
            wm.add_linear(self.qkv_proj, f"{hf}.self_attn.{x}_proj", f"{gguf}.attn_{x}", x, fix)
        wm.add_linear(self.o_proj, f"{hf}.self_attn.o_proj", f"{gguf}.attn_output")


class LlamaMLP:
    def __init__(self, hidden: int, intermediate: int, bias: bool, opts: LoadOptions) -> None:
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias, opts.tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, opts.tp)

    def declare(self, wm: WeightMap, hf: str, gguf: str, gguf_ffn: str = "ffn") -> None:
        wm.add_linear(self.gate_up_proj, f"{hf}.gate_proj", f"{gguf}.{gguf_ffn}_gate", 0)
        wm.add_linear(self.gate_up_proj, f"{hf}.up_proj", f"{gguf}.{gguf_ffn}_up", 1)
        wm.add_linear(self.down_proj, f"{hf}.down_proj", f"{gguf}.{gguf_ffn}_down")

    def finish(self, opts: LoadOptions) -> None:
        self.gate_up_proj.finish(opts)
        self.down_proj.finish(opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(ops.silu_and_mul(self.gate_up_proj.forward(x)))


class LlamaDecoderLayer:
    def __init__(self, config: ModelConfig, layer: int, opts: LoadOptions) -> None:
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c, layer, opts)
        self.mlp = LlamaMLP(c.hidden_size, c.intermediate_size, c.mlp_bias, opts)

    def finish(self, opts: LoadOptions) -> None:
        for part in (self.input_layernorm, self.post_attention_layernorm):
            part.finish(opts)
        self.self_attn.finish(opts)
        self.mlp.finish(opts)

    def describe(self) -> DecoderLayerSpec:
        a = self.self_attn
        return DecoderLayerSpec(
            input_norm=self.input_layernorm.weight,
            post_attention_norm=self.post_attention_layernorm.weight,
            qkv=a.qkv_proj.describe(),
            o=a.o_proj.describe(),
            gate_up=self.mlp.gate_up_proj.describe(),
            down=self.mlp.down_proj.describe(),
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            scale=a.scale,
            eps=self.input_layernorm.eps,
            sliding_window=a.sliding_window,
            tp_size=a.o_proj.tp.size,
        )


class LlamaForCausalLM(DecoderModel):
    def __init__(self, config: ModelConfig, opts: LoadOptions) -> None:
        self.config, self.opts = config, opts
        self.dtype, self.device = opts.dtype, opts.device
        self.rotary = RotaryEmbedding(config, opts.device)
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, opts.tp)
        self.layers = [LlamaDecoderLayer(config, i, opts) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = LMHead(self.embed_tokens, config.tie_word_embeddings)
        self.layer_specs: list[DecoderLayerSpec] = []

    # -- loading ----------------------------------------------------------------------------

    def weight_map(self) -> WeightMap:
        c = self.config
        wm = WeightMap(c.architecture)
        wm.add(
            self.embed_tokens.weight_shape(),
            self.embed_tokens.load_weight,
            "model.embed_tokens.weight",
            "token_embd.weight",
        )
        wm.add_norm(self.norm, "model.norm", "output_norm")
        if c.tie_word_embeddings:
            wm.ignore(r"lm_head\.weight|output\.weight")
        else:
            wm.add(
                self.embed_tokens.weight_shape(), self.lm_head.load_weight, "lm_head.weight", "output.weight"
            )
        wm.add(
            (c.head_dim // 2,),
            self.rotary.set_freq_factors,
            "model.rotary_emb.freq_factors",
            "rope_freqs.weight",
            required=False,
        )
        wm.ignore(IGNORED)
        # llama.cpp permutes q/k rows of what it converts as "llama" (Llama, Mistral, Mixtral)
        permuted = (c.num_attention_heads, c.num_key_value_heads) if c.architecture != "qwen2" else None
        for i, layer in enumerate(self.layers):
            hf, gguf = f"model.layers.{i}", f"blk.{i}"
            wm.add_norm(layer.input_layernorm, f"{hf}.input_layernorm", f"{gguf}.attn_norm")
            wm.add_norm(layer.post_attention_layernorm, f"{hf}.post_attention_layernorm", f"{gguf}.ffn_norm")
            layer.self_attn.declare(wm, hf, gguf, permuted)
            layer.mlp.declare(wm, f"{hf}.mlp", gguf)
        return wm

    def loaded(self) -> None:
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
        x, residual = ops.decoder_layers(self.layer_specs, x, None, cos, sin, kv_caches, metas)
        x, _ = self.norm.add_forward(x, residual)
        return x
