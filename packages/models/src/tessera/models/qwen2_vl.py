"""Qwen2-VL: a vision transformer with 2-D rotary over patch rows and columns, a patch merger, and a
Qwen2 language model with M-RoPE (3-D positions).

An image (or a video, in groups of ``temporal_patch_size`` frames) arrives as patch rows in the
order the processor writes them: by temporal group, then merge window (row-major), then patch
inside the window. The vision blocks attend within each frame group of one image, and the
merger turns each window of ``spatial_merge_size``^2 patches into one row of the language
model's width (``embed_multimodal``). The prompt holds one image (or video) token per such row;
``forward`` takes positions ``[3, T]`` (temporal, height, width: tessera.multimodal's
``mrope_positions``; text tokens have three equal rows) or ``[T]`` (plain RoPE). The vision
transformer is replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F

from tessera.formats import ModelConfig, Qwen2VLVisionConfig
from tessera.kernels import ops

from .linear import LoadOptions, ReplicatedLinear
from .llama import LlamaForCausalLM
from .llava import ACTIVATIONS, LayerNorm
from .rotary import base_inv_freq
from .vision_language import VisionLanguageModel
from .weight_map import WeightMap

# checkpoint names -> ours (the language model's as a text checkpoint names them): transformers 5
# names the parts ``model.visual.``, ``model.language_model.``; Qwen's hub files and transformers'
# save_pretrained write ``visual.`` and ``model.``.
_RENAMES = [
    (re.compile(r"(?:model\.)?visual\."), "visual."),
    (re.compile(r"model\.language_model\."), "model."),
]


def checkpoint_name(name: str) -> str:
    """The name a Qwen2-VL checkpoint tensor is declared under here."""
    for pattern, ours in _RENAMES:
        m = pattern.match(name)
        if m:
            return ours + name[m.end() :]
    return name


def vision_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """``[patches, 2]`` (row, column) of every patch in the processor's order: per temporal
    group, merge windows row-major, patches inside a window row-major (transformers'
    ``get_vision_position_ids``)."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h).view(h // merge, 1, merge, 1).expand(-1, w // merge, -1, merge)
        cols = torch.arange(w).view(1, w // merge, 1, merge).expand(h // merge, -1, merge, -1)
        out.append(torch.stack([rows.flatten(), cols.flatten()], dim=-1).repeat(t, 1))
    return torch.cat(out)


class VisionAttention:
    """Full attention among the patches of one frame group of one image; q|k|v in one matmul
    (one checkpoint tensor), rotary on q and k in fp32 as transformers does."""

    def __init__(self, v: Qwen2VLVisionConfig) -> None:
        self.qkv = ReplicatedLinear(v.embed_dim, 3 * v.embed_dim, bias=True)
        self.proj = ReplicatedLinear(v.embed_dim, v.embed_dim, bias=True)
        self.num_heads, self.head_dim = v.num_heads, v.embed_dim // v.num_heads

    def declare(self, wm: WeightMap, prefix: str) -> None:
        wm.add_linear(self.qkv, f"{prefix}.qkv", None)
        wm.add_linear(self.proj, f"{prefix}.proj", None)

    def finish(self, opts: LoadOptions) -> None:
        self.qkv.finish(opts)
        self.proj.finish(opts)

    def forward(self, x: torch.Tensor, cos, sin, groups: list[tuple[int, int]]) -> torch.Tensor:
        """``x``: ``[patches, embed]``; ``groups``: per image, (frame groups, patches per group)
        in row order."""
        dim, d = x.shape[1], self.head_dim
        q, k, v = self.qkv.forward(x).split(dim, dim=-1)
        q, k = ops.rotary_embedding(q.float(), k.float(), cos, sin, d)
        q, k = q.to(x.dtype), k.to(x.dtype)
        out, start = [], 0
        for t, per in groups:
            rows = slice(start, start + t * per)
            qi, ki, vi = (y[rows].reshape(t, per, self.num_heads, d).transpose(1, 2) for y in (q, k, v))
            out.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(1, 2).reshape(t * per, dim))
            start += t * per
        return self.proj.forward(torch.cat(out) if len(out) > 1 else out[0])


class VisionBlock:
    def __init__(self, v: Qwen2VLVisionConfig) -> None:
        self.norm1 = LayerNorm(v.embed_dim, v.layer_norm_eps)
        self.norm2 = LayerNorm(v.embed_dim, v.layer_norm_eps)
        self.attn = VisionAttention(v)
        self.fc1 = ReplicatedLinear(v.embed_dim, v.mlp_hidden, bias=True)
        self.fc2 = ReplicatedLinear(v.mlp_hidden, v.embed_dim, bias=True)
        self.act = ACTIVATIONS[v.hidden_act]

    def declare(self, wm: WeightMap, prefix: str) -> None:
        self.norm1.declare(wm, f"{prefix}.norm1")
        self.norm2.declare(wm, f"{prefix}.norm2")
        self.attn.declare(wm, f"{prefix}.attn")
        wm.add_linear(self.fc1, f"{prefix}.mlp.fc1", None)
        wm.add_linear(self.fc2, f"{prefix}.mlp.fc2", None)

    def finish(self, opts: LoadOptions) -> None:
        for part in (self.norm1, self.norm2, self.attn, self.fc1, self.fc2):
            part.finish(opts)

    def forward(self, x: torch.Tensor, cos, sin, groups: list[tuple[int, int]]) -> torch.Tensor:
        x = x + self.attn.forward(self.norm1.forward(x), cos, sin, groups)
        return x + self.fc2.forward(self.act(self.fc1.forward(self.norm2.forward(x))))


class PatchMerger:
    """LayerNorm per patch, then each window of merge^2 consecutive patches as one row through
    linear, GELU, linear into the language model's width."""

    def __init__(self, v: Qwen2VLVisionConfig) -> None:
        self.merged = v.embed_dim * v.spatial_merge_size**2
        self.ln_q = LayerNorm(v.embed_dim, v.layer_norm_eps)
        self.fc1 = ReplicatedLinear(self.merged, self.merged, bias=True)
        self.fc2 = ReplicatedLinear(self.merged, v.hidden_size, bias=True)

    def declare(self, wm: WeightMap, prefix: str) -> None:
        self.ln_q.declare(wm, f"{prefix}.ln_q")
        wm.add_linear(self.fc1, f"{prefix}.mlp.0", None)
        wm.add_linear(self.fc2, f"{prefix}.mlp.2", None)

    def finish(self, opts: LoadOptions) -> None:
        for part in (self.ln_q, self.fc1, self.fc2):
            part.finish(opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q.forward(x).reshape(-1, self.merged)
        return self.fc2.forward(F.gelu(self.fc1.forward(x)))


class Qwen2VisionTransformer:
    """Patches (a Conv3d with kernel = stride, as one matmul over flattened patches), vision
    blocks with 2-D rotary, the patch merger."""

    def __init__(self, v: Qwen2VLVisionConfig) -> None:
        self.config = v
        self.blocks = [VisionBlock(v) for _ in range(v.depth)]
        self.merger = PatchMerger(v)
        self.patch_weight: torch.Tensor | None = None  # [embed, channels * frames * patch * patch]
        # the 2-D rotary's frequencies: head_dim / 4 for rows, as many for columns
        self.inv_freq = base_inv_freq(v.rope_theta, v.embed_dim // v.num_heads // 2)

    def declare(self, wm: WeightMap, prefix: str) -> None:
        v = self.config
        shape = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

        def patch(t: torch.Tensor) -> None:
            self.patch_weight = t.reshape(v.embed_dim, -1)

        wm.add(shape, patch, f"{prefix}.patch_embed.proj.weight")
        for i, block in enumerate(self.blocks):
            block.declare(wm, f"{prefix}.blocks.{i}")
        self.merger.declare(wm, f"{prefix}.merger")

    def finish(self, opts: LoadOptions) -> None:
        self.patch_weight = self.patch_weight.to(device=opts.device, dtype=opts.dtype)
        self.inv_freq = self.inv_freq.to(opts.device)
        for block in self.blocks:
            block.finish(opts)
        self.merger.finish(opts)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """``[patches, C*T*P*P]`` of the images in ``grid_thw`` -> ``[patches / merge^2, hidden]``."""
        pos = vision_positions(grid_thw, self.config.spatial_merge_size).to(pixel_values.device)
        freqs = (pos[:, :, None].float() * self.inv_freq).flatten(1)  # [patches, head_dim / 2]
        cos, sin = freqs.cos(), freqs.sin()
        groups = [(t, h * w) for t, h, w in grid_thw]
        x = ops.linear(pixel_values, self.patch_weight)
        for block in self.blocks:
            x = block.forward(x, cos, sin, groups)
        return self.merger.forward(x)


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    """The contract of a text model (``CausalLM``, delegated to the Qwen2 language model) and of
    one that takes images and videos (``SupportsMultiModal``), with M-RoPE positions."""

    uses_mrope = True

    def __init__(self, config: ModelConfig, opts: LoadOptions) -> None:
        mm = config.multimodal
        self.config, self.opts, self.dtype, self.device = config, opts, opts.dtype, opts.device
        self.image_token_id, self.video_token_id = mm.image_token_id, mm.video_token_id
        self.placeholder_ids = (mm.image_token_id, mm.video_token_id)
        text = replace(config, architecture=mm.text_architecture, multimodal=None)
        self.language_model = LlamaForCausalLM(text, opts)
        self.visual = Qwen2VisionTransformer(mm.vision)

    @property
    def spatial_merge_size(self) -> int:
        return self.config.multimodal.vision.spatial_merge_size

    # -- loading ----------------------------------------------------------------------------

    def weight_map(self) -> WeightMap:
        """The language model's names as a text checkpoint has them, then ``visual.``
        (``checkpoint_name`` maps transformers 5's names onto these)."""
        wm = self.language_model.weight_map()
        wm.architecture = self.config.architecture
        self.visual.declare(wm, "visual")
        return wm

    def load_weights(
        self, weights: Iterable[tuple[str, object]], progress: Callable[[int, int], None] | None = None
    ) -> None:
        self.weight_map().load(((checkpoint_name(n), t) for n, t in weights), progress)
        self.language_model.finish_loading()
        self.visual.finish(self.opts)

    # -- images and videos ----------------------------------------------------------------------

    @torch.inference_mode()
    def embed_multimodal(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``pixel_values`` ``[patches, C*T*P*P]`` of n images or videos one after another (as
        Qwen2VLImageProcessor writes them), ``grid_thw`` ``[n, 3]`` their (t, h, w) in patches:
        per item, ``[t * h * w / merge^2, hidden]`` in the model's dtype."""
        v = self.config.multimodal.vision
        if grid_thw is None:
            raise ValueError("Qwen2-VL needs grid_thw, the (t, h, w) patch grid of each image or video")
        grids = [tuple(g) for g in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
        m = v.spatial_merge_size
        if pixel_values.dim() != 2 or pixel_values.shape[1] != v.patch_features:
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}, expected [patches, {v.patch_features}] "
                f"(channels {v.in_channels} x frames {v.temporal_patch_size} x {v.patch_size}^2 pixels)"
            )
        bad = [g for g in grids if min(g) < 1 or g[1] % m or g[2] % m]
        if bad:
            raise ValueError(f"grid {list(bad[0])}: h and w must be positive multiples of the merge size {m}")
        total = sum(t * h * w for t, h, w in grids)
        if total != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patch rows but grid_thw says {total}")
        out = self.visual.forward(pixel_values.to(device=self.device, dtype=self.dtype), grids)
        return list(out.split([t * h * w // m**2 for t, h, w in grids]))
