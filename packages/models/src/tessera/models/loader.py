"""Building a model from a checkpoint: the registry picks the class, the model maps its own
tensor names (``load_weights``); nothing here knows an architecture."""

from __future__ import annotations

import torch

from tessera.formats import Checkpoint, FormatError

from .linear import LoadOptions
from .parallel import TPInfo
from .registry import model_class


def load_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress=None,
    packed_weights: bool = False,
    tp: TPInfo | None = None,
):
    """The model of ``checkpoint`` with weights in ``dtype`` on ``device``.

    Quantized (GGUF) weights are dequantized at load, or with ``packed_weights`` kept packed for
    the kernel backend's own quantized matmul where it has one (the CPU backend: Q4_0, Q4_1,
    Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). GPTQ, AWQ and EXL2 weights are dequantized at load to
    ``dtype``, except that with ``packed_weights`` they become GGUF blocks behind an input
    permutation and stay packed (``GroupQuant.blocks``, ``GroupsPacked``). ``progress``, if
    given, is called as ``progress(done, total)`` while tensors load. ``tp`` is this process's
    tensor-parallel rank.
    """
    config = checkpoint.config
    try:
        cls = model_class(config.architecture)
        opts = LoadOptions(dtype, torch.device(device), packed_weights, tp or TPInfo())
        model = cls(config, opts)
        model.load_weights(checkpoint.weights(), progress)
    except FormatError as e:
        raise FormatError(f"{checkpoint.path}: {e}") from None
    return model


def expected_shapes(config, style: str = "hf") -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of ``config`` must hold, by their HF (or GGUF) names."""
    return model_class(config.architecture)(config, LoadOptions()).weight_map().shapes(style)
