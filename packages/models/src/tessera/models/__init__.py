"""Layers and architectures on a ragged, paged batch, and the contract they keep."""

from .attention_metadata import AttentionMetadata, build_attention_metadata, per_layer
from .kv_cache import LayerKVCache
from .linear import (
    ColumnParallelLinear,
    LoadOptions,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from .loader import expected_shapes, kv_cache_spec, load_model
from .parallel import TPInfo, check_tensor_parallel, tensor_parallel_sizes
from .registry import CausalLM, KVCacheSpec, SupportsMultiModal, model_class, supported_architectures
from .rotary import RotaryEmbedding

__all__ = [
    "AttentionMetadata",
    "CausalLM",
    "ColumnParallelLinear",
    "KVCacheSpec",
    "LayerKVCache",
    "LoadOptions",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SupportsMultiModal",
    "TPInfo",
    "build_attention_metadata",
    "check_tensor_parallel",
    "expected_shapes",
    "kv_cache_spec",
    "load_model",
    "model_class",
    "per_layer",
    "supported_architectures",
    "tensor_parallel_sizes",
]
