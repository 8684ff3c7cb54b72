"""Layers and architectures on a ragged, paged batch."""

from .attention_metadata import AttentionMetadata
from .kv_cache import KV_STORAGE_DTYPES, LayerKVCache, kv_storage_dtype
from .llama import LlamaForCausalLM
from .loader import MODEL_CLASSES, expected_shapes, load_model
from .rotary import RotaryEmbedding

__all__ = [
    "MODEL_CLASSES",
    "AttentionMetadata",
    "KV_STORAGE_DTYPES",
    "LayerKVCache",
    "kv_storage_dtype",
    "LlamaForCausalLM",
    "RotaryEmbedding",
    "expected_shapes",
    "load_model",
]
