"""The model contract and the registry from architecture name to the class that implements it.

A model is built from its ModelConfig and LoadOptions, receives its checkpoint's tensors by
their names in ``load_weights``, and then serves ``forward`` on a ragged, paged batch. Adding a
family is one file in this package and a line in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from tessera.formats import FormatError, ModelConfig

from .attention_metadata import AttentionMetadata
from .kv_cache import LayerKVCache


@dataclass(frozen=True)
class KVCacheSpec:
    """What one layer keeps per token: full attention, or a sliding window of ``window`` tokens."""

    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None

    @property
    def kind(self) -> str:
        return "full" if self.sliding_window is None else "sliding"


class CausalLM(Protocol):
    config: ModelConfig
    dtype: torch.dtype
    device: torch.device

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[T, hidden]`` embeddings (a multimodal model merges its encoder's outputs here)."""

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[LayerKVCache],
        attn_metadata: AttentionMetadata | list[AttentionMetadata],
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm. ``attn_metadata`` is one per
        layer (layers of a KV cache group share theirs) or one for all."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[N, vocab]``."""

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        """One per layer, in order."""

    def load_weights(
        self, weights: Iterable[tuple[str, object]], progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Take the checkpoint's tensors by their own names (HF or GGUF) and prepare them."""


@runtime_checkable
class SupportsMultiModal(Protocol):
    """What a model that takes images adds to ``CausalLM`` (text models lack it; test with
    ``isinstance(model, SupportsMultiModal)``). The engine runs the encoder once per image and
    may cache its output; a prompt holds one placeholder token (``config.multimodal.
    image_token_id``, or ``video_token_id``) per row of the image's embeddings (LLaVA:
    ``config.multimodal.tokens_per_image`` of them; Qwen2-VL: t*h*w / merge^2 of its grid), and
    ``forward`` then takes the merged rows as ``inputs_embeds``.

    A model with ``uses_mrope`` True (Qwen2-VL) takes ``positions`` ``[3, T]`` in ``forward``
    (temporal, height, width; tessera.multimodal's ``mrope_positions`` for a prompt, and
    ``j + delta`` in all three rows for the token at index j past it); its
    ``spatial_merge_size`` is the processor's merge size. Models without the attribute take
    ``[T]``."""

    def embed_multimodal(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The encoder and projector on preprocessed images: per image, ``[tokens, hidden]`` in
        the model's dtype, ready to stand for its tokens. LLaVA: ``[n, channels, H, W]``
        (``grid_thw`` ignored); Qwen2-VL: patch rows ``[patches, C*T*P*P]`` of the n images or
        videos one after another and their ``grid_thw`` ``[n, 3]``."""

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: torch.Tensor | list[torch.Tensor] | None = None,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[T, hidden]`` text embeddings of ``input_ids`` with the rows at ``is_multimodal``
        (a bool mask over ``input_ids``; default: where the id is the image token) replaced, in
        order, by the rows of ``multimodal_embeddings`` (concatenated where a list). A chunk of
        a prompt passes the rows of its own placeholders only, which may be part of an image."""


# architecture (our name: HF model_type; GGUF names are mapped by formats) -> "module:Class"
_REGISTRY = {
    "llama": "llama:LlamaForCausalLM",
    "mistral": "llama:LlamaForCausalLM",
    "qwen2": "llama:LlamaForCausalLM",
    "gemma3": "gemma3:Gemma3ForCausalLM",
    "mixtral": "mixtral:MixtralForCausalLM",
    "qwen2_moe": "qwen_moe:Qwen2MoeForCausalLM",
    "qwen3_moe": "qwen_moe:Qwen3MoeForCausalLM",
    "llava": "llava:LlavaForConditionalGeneration",
    "qwen2_vl": "qwen2_vl:Qwen2VLForConditionalGeneration",
}
# HF ``architectures`` class names -> our names
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlavaForConditionalGeneration": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
}


def supported_architectures() -> list[str]:
    return list(_REGISTRY)


def model_class(architecture: str) -> type:
    """The class for ``architecture`` (ours or an HF class name); FormatError listing the
    supported ones otherwise."""
    name = HF_ARCHITECTURES.get(architecture, architecture)
    if name not in _REGISTRY:
        raise FormatError(
            f"no model class for architecture {architecture!r} (supported: {', '.join(_REGISTRY)})"
        )
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
