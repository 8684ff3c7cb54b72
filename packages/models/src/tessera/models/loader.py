"""Building a model from a checkpoint: the registry picks the class, the model maps its own
tensor names (``load_weights``); nothing here knows an architecture."""

from __future__ import annotations

import torch

from tessera.formats import Checkpoint, FormatError

from .linear import LoadOptions
from .parallel import TPInfo, check_tensor_parallel
from .registry import KVCacheSpec, model_class


def load_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress=None,
    packed_weights: bool = False,
    tp: TPInfo | None = None,
    quantize: str | None = None,
    lm_head_rows=None,
):
    """The model of ``checkpoint`` with weights in ``dtype`` on ``device``.

    Quantized (GGUF) weights are dequantized at load, or with ``packed_weights`` kept packed for
    the kernel backend's own quantized matmul where it has one (the CPU backend: Q4_0, Q4_1,
    Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). GPTQ, AWQ and EXL2 weights are dequantized at load to
    ``dtype``, except that with ``packed_weights`` they become GGUF blocks behind an input
    permutation and stay packed (``GroupQuant.blocks``, ``GroupsPacked``). ``progress``, if
    given, is called as ``progress(done, total)`` while tensors load. ``tp`` is this process's
    tensor-parallel rank: a model that does not split over ``tp.size`` ranks is a ValueError
    before anything loads (``check_tensor_parallel``). ``quantize`` and ``lm_head_rows``: see
    ``LoadOptions`` (a speculative draft re-quantized, its head cut to the tokens it proposes).
    """
    config, tp = checkpoint.config, tp or TPInfo()
    check_tensor_parallel(config, tp.size)
    try:
        cls = model_class(config.architecture)
        rows = None if lm_head_rows is None else tuple(int(i) for i in lm_head_rows)
        opts = LoadOptions(dtype, torch.device(device), packed_weights, tp, quantize, rows)
        model = cls(config, opts)
        model.load_weights(checkpoint.weights(), progress)
    except FormatError as e:
        raise FormatError(f"{checkpoint.path}: {e}") from None
    return model


def expected_shapes(config, style: str = "hf") -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of ``config`` must hold, by their HF (or GGUF) names."""
    return model_class(config.architecture)(config, LoadOptions()).weight_map().shapes(style)


def kv_cache_spec(config, tp: TPInfo | None = None) -> list[KVCacheSpec]:
    """The KV cache spec per layer of the model of ``config`` on tensor-parallel rank ``tp``
    (its share of the KV heads: ``max(1, kv_heads // size)``), without loading weights."""
    tp = tp or TPInfo()
    check_tensor_parallel(config, tp.size)
    return model_class(config.architecture)(config, LoadOptions(tp=tp)).kv_cache_spec()
