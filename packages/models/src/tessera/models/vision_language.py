"""What every vision-language model shares: a language model it delegates the text contract to
(``CausalLM``), and the merge of encoder outputs into the input embeddings at the placeholder
tokens (``SupportsMultiModal.embed_input_ids``). A model adds its vision tower, its weight names
and ``embed_multimodal``."""

from __future__ import annotations

import torch

from .attention_metadata import AttentionMetadata
from .kv_cache import LayerKVCache
from .registry import KVCacheSpec


class VisionLanguageModel:
    language_model: object  # a CausalLM: the text side
    placeholder_ids: tuple[int, ...]  # the tokens an encoder output's rows replace

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: torch.Tensor | list[torch.Tensor] | None = None,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The text embeddings of ``input_ids`` with the rows at ``is_multimodal`` (default: the
        placeholder tokens) replaced, in order, by the concatenated ``multimodal_embeddings``."""
        x = self.language_model.embed_input_ids(input_ids)
        if multimodal_embeddings is None:
            return x
        if isinstance(multimodal_embeddings, (list, tuple)):
            if not multimodal_embeddings:
                return x
            multimodal_embeddings = torch.cat(list(multimodal_embeddings))
        if is_multimodal is None:
            is_multimodal = torch.isin(input_ids, torch.tensor(self.placeholder_ids, device=input_ids.device))
        if is_multimodal.dtype != torch.bool or is_multimodal.shape != input_ids.shape:
            raise ValueError(f"is_multimodal must be a bool mask of shape {list(input_ids.shape)}")
        rows = int(is_multimodal.sum())
        if rows != multimodal_embeddings.shape[0]:
            raise ValueError(
                f"{rows} placeholder positions but {multimodal_embeddings.shape[0]} embedding rows"
            )
        x[is_multimodal] = multimodal_embeddings.to(device=x.device, dtype=x.dtype)
        return x

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[LayerKVCache],
        attn_metadata: AttentionMetadata | list[AttentionMetadata],
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language_model.forward(input_ids, positions, kv_caches, attn_metadata, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        return self.language_model.kv_cache_spec()
