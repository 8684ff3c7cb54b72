"""LLaVA-1.5: a CLIP vision tower, a two-layer projector, and a Llama-family language model.

An image becomes ``tokens_per_image`` rows in the language model's embedding space
(``embed_multimodal``); the prompt holds that many image placeholder tokens, whose embedding
rows ``embed_input_ids`` replaces; ``forward`` runs the language model on the merged rows
(``inputs_embeds``) over the paged cache like any text model. The vision tower and projector are
replicated on every tensor-parallel rank (they are small next to the language model).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from tessera.formats import ModelConfig, VisionConfig
from tessera.kernels import ops

from .linear import LoadOptions, MergedColumnParallelLinear, ReplicatedLinear
from .llama import LlamaForCausalLM
from .vision_language import VisionLanguageModel
from .weight_map import WeightMap


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
}

# checkpoint names -> ours (the language model's as a text checkpoint names them). transformers 5
# keeps ``model.vision_tower.`` etc. in memory; llava-hf checkpoints (and transformers' own
# save_pretrained) write the 4.x layout; CLIP's ``vision_model.`` level went away in 5.x.
_RENAMES = [
    (re.compile(r"(?:model\.)?vision_tower\.(?:vision_model\.)?"), "vision_tower."),
    (re.compile(r"(?:model\.)?multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"model\.language_model\.|language_model\.model\."), "model."),
    (re.compile(r"language_model\.lm_head\."), "lm_head."),
]


def checkpoint_name(name: str) -> str:
    """The name a LLaVA checkpoint tensor is declared under here."""
    for pattern, ours in _RENAMES:
        m = pattern.match(name)
        if m:
            return ours + name[m.end() :]
    return name


class LayerNorm:
    """``(x - mean) / std * w + b`` over the last dimension. tessera.kernels has no layer-norm op
    (the language models use RMSNorm), so this is torch's, which runs on every device."""

    def __init__(self, hidden: int, eps: float) -> None:
        self.hidden, self.eps = hidden, eps
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def declare(self, wm: WeightMap, name: str) -> None:
        wm.add((self.hidden,), lambda t: setattr(self, "weight", t), f"{name}.weight")
        wm.add((self.hidden,), lambda t: setattr(self, "bias", t), f"{name}.bias")

    def finish(self, opts: LoadOptions) -> None:
        self.weight = self.weight.to(device=opts.device, dtype=opts.dtype)
        self.bias = self.bias.to(device=opts.device, dtype=opts.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), self.weight, self.bias, self.eps)


class CLIPAttention:
    """Full (bidirectional) attention among one image's tokens; q|k|v in one matmul."""

    def __init__(self, v: VisionConfig) -> None:
        h = v.hidden_size
        self.qkv_proj = MergedColumnParallelLinear(h, [h, h, h], bias=True)
        self.out_proj = ReplicatedLinear(h, h, bias=True)
        self.num_heads, self.head_dim = v.num_attention_heads, h // v.num_attention_heads

    def declare(self, wm: WeightMap, prefix: str) -> None:
        for shard, x in enumerate("qkv"):
            wm.add_linear(self.qkv_proj, f"{prefix}.{x}_proj", None, shard)
        wm.add_linear(self.out_proj, f"{prefix}.out_proj", None)

    def finish(self, opts: LoadOptions) -> None:
        self.qkv_proj.finish(opts)
        self.out_proj.finish(opts)

    def forward(self, x: torch.Tensor, n_images: int) -> torch.Tensor:
        """``x``: ``[n_images * tokens, hidden]``."""
        t, h = x.shape[0] // n_images, x.shape[1]
        qkv = self.qkv_proj.forward(x).reshape(n_images, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [n, heads, t, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, no mask
        return self.out_proj.forward(out.transpose(1, 2).reshape(n_images * t, h))


class CLIPEncoderLayer:
    def __init__(self, v: VisionConfig) -> None:
        self.layer_norm1 = LayerNorm(v.hidden_size, v.layer_norm_eps)
        self.self_attn = CLIPAttention(v)
        self.layer_norm2 = LayerNorm(v.hidden_size, v.layer_norm_eps)
        self.fc1 = ReplicatedLinear(v.hidden_size, v.intermediate_size, bias=True)
        self.fc2 = ReplicatedLinear(v.intermediate_size, v.hidden_size, bias=True)
        self.act = ACTIVATIONS[v.hidden_act]

    def declare(self, wm: WeightMap, prefix: str) -> None:
        self.layer_norm1.declare(wm, f"{prefix}.layer_norm1")
        self.self_attn.declare(wm, f"{prefix}.self_attn")
        self.layer_norm2.declare(wm, f"{prefix}.layer_norm2")
        wm.add_linear(self.fc1, f"{prefix}.mlp.fc1", None)
        wm.add_linear(self.fc2, f"{prefix}.mlp.fc2", None)

    def finish(self, opts: LoadOptions) -> None:
        for part in (self.layer_norm1, self.self_attn, self.layer_norm2, self.fc1, self.fc2):
            part.finish(opts)

    def forward(self, x: torch.Tensor, n_images: int) -> torch.Tensor:
        x = x + self.self_attn.forward(self.layer_norm1.forward(x), n_images)
        return x + self.fc2.forward(self.act(self.fc1.forward(self.layer_norm2.forward(x))))


class CLIPVisionTower:
    """Patches (a stride-``patch`` convolution, as one matmul over flattened patches), a class
    token, learned positions, a pre-norm, then encoder layers. Only the layers up to the deepest
    feature layer are built and run (LLaVA-1.5 reads the second to last)."""

    def __init__(self, v: VisionConfig, feature_layers: tuple[int, ...], full: bool) -> None:
        self.config, self.full = v, full
        # hidden state i is the output of i layers (0: the normed embeddings)
        self.feature_layers = [i if i >= 0 else v.num_hidden_layers + 1 + i for i in feature_layers]
        self.layers = [CLIPEncoderLayer(v) for _ in range(max(self.feature_layers))]
        self.pre_layrnorm = LayerNorm(v.hidden_size, v.layer_norm_eps)  # sic: CLIP's spelling
        self.patch_weight: torch.Tensor | None = None  # [hidden, channels * patch * patch]
        self.class_embedding: torch.Tensor | None = None
        self.position_embedding: torch.Tensor | None = None

    def declare(self, wm: WeightMap, prefix: str) -> None:
        v = self.config
        h, p = v.hidden_size, v.patch_size

        def patch(t: torch.Tensor) -> None:
            self.patch_weight = t.reshape(h, -1)

        wm.add((h, v.num_channels, p, p), patch, f"{prefix}.embeddings.patch_embedding.weight")
        wm.add((h,), lambda t: setattr(self, "class_embedding", t), f"{prefix}.embeddings.class_embedding")
        wm.add(
            (v.num_patches + 1, h),
            lambda t: setattr(self, "position_embedding", t),
            f"{prefix}.embeddings.position_embedding.weight",
        )
        self.pre_layrnorm.declare(wm, f"{prefix}.pre_layrnorm")
        for i, layer in enumerate(self.layers):
            layer.declare(wm, f"{prefix}.encoder.layers.{i}")
        # the pooled output's norm, layers past the last feature layer, a persisted buffer
        unused = "|".join(str(i) for i in range(len(self.layers), v.num_hidden_layers)) or "x"
        wm.ignore(rf"{prefix}\.post_layernorm\.(weight|bias)")
        wm.ignore(rf"{prefix}\.encoder\.layers\.({unused})\..+")
        wm.ignore(rf"{prefix}\.embeddings\.position_ids")

    def finish(self, opts: LoadOptions) -> None:
        for name in ("patch_weight", "class_embedding", "position_embedding"):
            setattr(self, name, getattr(self, name).to(device=opts.device, dtype=opts.dtype))
        self.pre_layrnorm.finish(opts)
        for layer in self.layers:
            layer.finish(opts)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n, channels, size, size]`` -> the selected features ``[n, tokens, hidden * k]``."""
        v = self.config
        n, c, p, h = pixel_values.shape[0], v.num_channels, v.patch_size, v.hidden_size
        g = v.image_size // p  # patches per side
        patches = pixel_values.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, -1)
        x = ops.linear(patches, self.patch_weight).reshape(n, g * g, h)
        x = torch.cat([self.class_embedding.expand(n, 1, h), x], dim=1) + self.position_embedding
        x = self.pre_layrnorm.forward(x.reshape(n * (g * g + 1), h))
        states = [x]
        for layer in self.layers:
            x = layer.forward(x, n)
            states.append(x)
        features = [states[i].reshape(n, g * g + 1, h) for i in self.feature_layers]
        if not self.full:  # "default": the class token is dropped
            features = [f[:, 1:] for f in features]
        return torch.cat(features, dim=-1)


class LlavaProjector:
    """Vision features -> the language model's embedding space: linear, activation, linear."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool) -> None:
        self.linear_1 = ReplicatedLinear(in_features, hidden, bias)
        self.linear_2 = ReplicatedLinear(hidden, hidden, bias)
        self.act = ACTIVATIONS[act]

    def declare(self, wm: WeightMap, prefix: str) -> None:
        wm.add_linear(self.linear_1, f"{prefix}.linear_1", None)
        wm.add_linear(self.linear_2, f"{prefix}.linear_2", None)

    def finish(self, opts: LoadOptions) -> None:
        self.linear_1.finish(opts)
        self.linear_2.finish(opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2.forward(self.act(self.linear_1.forward(x)))


class LlavaForConditionalGeneration(VisionLanguageModel):
    """The contract of a text model (``CausalLM``, delegated to the language model) and of one
    that takes images (``SupportsMultiModal``)."""

    def __init__(self, config: ModelConfig, opts: LoadOptions) -> None:
        mm = config.multimodal
        self.config, self.opts, self.dtype, self.device = config, opts, opts.dtype, opts.device
        self.image_token_id = mm.image_token_id
        self.placeholder_ids = (mm.image_token_id,)
        self.tokens_per_image = mm.tokens_per_image
        text = replace(config, architecture=mm.text_architecture, multimodal=None)
        self.language_model = LlamaForCausalLM(text, opts)
        full = mm.vision_feature_select_strategy == "full"
        self.vision_tower = CLIPVisionTower(mm.vision, mm.vision_feature_layers, full)
        features = mm.vision.hidden_size * len(mm.vision_feature_layers)
        self.multi_modal_projector = LlavaProjector(
            features, config.hidden_size, mm.projector_hidden_act, mm.projector_bias
        )

    # -- loading ----------------------------------------------------------------------------

    def weight_map(self) -> WeightMap:
        """The language model's names as a text checkpoint has them, then ours (``checkpoint_name``
        maps a LLaVA checkpoint's names onto these)."""
        wm = self.language_model.weight_map()
        wm.architecture = self.config.architecture
        self.vision_tower.declare(wm, "vision_tower")
        self.multi_modal_projector.declare(wm, "multi_modal_projector")
        return wm

    def load_weights(
        self, weights: Iterable[tuple[str, object]], progress: Callable[[int, int], None] | None = None
    ) -> None:
        self.weight_map().load(((checkpoint_name(n), t) for n, t in weights), progress)
        self.language_model.finish_loading()
        self.vision_tower.finish(self.opts)
        self.multi_modal_projector.finish(self.opts)

    # -- images -----------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_multimodal(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``grid_thw`` is Qwen2-VL's (every LLaVA image has the tower's fixed size): ignored."""
        v = self.config.multimodal.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}, expected "
                f"[n, {', '.join(map(str, want))}] (images preprocessed to the vision tower's size)"
            )
        n = pixel_values.shape[0]
        features = self.vision_tower.forward(pixel_values.to(device=self.device, dtype=self.dtype))
        out = self.multi_modal_projector.forward(features.reshape(-1, features.shape[-1]))
        return list(out.reshape(n, -1, out.shape[-1]).unbind(0))
