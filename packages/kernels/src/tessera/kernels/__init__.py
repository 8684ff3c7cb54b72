"""Op signatures, the dispatch registry, and the pure-torch reference of every op."""

from . import collectives, moe, ops, reference
from .capabilities import preferred_dtype
from .collectives import set_tensor_parallel_group, tensor_parallel_group
from .decoder import DecoderLayerSpec, LinearWeights, MoEWeights
from .registry import backend, declare_backend, explain, implementations, lookup, register, unregister
from .weights import InputSegments, RowStack, segments_linear

__all__ = [
    "DecoderLayerSpec",
    "LinearWeights",
    "MoEWeights",
    "InputSegments",
    "RowStack",
    "segments_linear",
    "backend",
    "collectives",
    "declare_backend",
    "explain",
    "implementations",
    "lookup",
    "moe",
    "ops",
    "preferred_dtype",
    "reference",
    "register",
    "set_tensor_parallel_group",
    "tensor_parallel_group",
    "unregister",
]
