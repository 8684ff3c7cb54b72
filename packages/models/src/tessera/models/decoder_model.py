"""What every decoder-only model here shares: loading through its WeightMap, then each part's
``finish``; the KV spec from its layers' attention; embedding lookup; logits."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .registry import KVCacheSpec


class DecoderModel:
    """A base for the families' model classes. A subclass builds ``embed_tokens``, ``layers``
    (each with ``self_attn`` and ``finish(opts)``), ``norm`` and ``lm_head`` and declares its
    names in ``weight_map()``."""

    def load_weights(
        self, weights: Iterable[tuple[str, object]], progress: Callable[[int, int], None] | None = None
    ) -> None:
        self.weight_map().load(weights, progress)
        self.finish_loading()

    def finish_loading(self) -> None:
        """Prepare every loaded weight for the backend (after ``weight_map().load``)."""
        self.embed_tokens.finish(self.opts, keep_packed=self.config.tie_word_embeddings)
        self.lm_head.finish(self.opts)
        self.norm.finish(self.opts)
        for layer in self.layers:
            layer.finish(self.opts)
        self.loaded()

    def loaded(self) -> None:
        """Called once every weight is prepared (Llama describes its layers for the kernels)."""

    def kv_cache_spec(self) -> list[KVCacheSpec]:
        return [
            KVCacheSpec(ly.self_attn.num_kv_heads, ly.self_attn.head_dim, ly.self_attn.sliding_window)
            for ly in self.layers
        ]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens.forward(input_ids, self.dtype)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.expand(self.lm_head.forward(hidden))
