"""Bits per weight of a checkpoint's linear layers, as stored.

Counted over the matrices (2-D or stacked-expert 3-D tensors) inside the decoder layers
(``blk.N.`` in GGUF, ``...layers.N.`` in HF folders): the embedding and output head are left
out, as ExLlamaV2 reports its bit rates. A tensor's bits are every byte of what the checkpoint
stores for it: a float tensor its element size; GGUF blocks their bytes, scales included
(Q8_0: 34 bytes per 32 weights = 8.5); GPTQ/AWQ its qweight, qzeros, scales and g_idx
(4-bit, groups of 128, fp16 scales: 4 + (16 + 4) / 128 + 32 / out_features); any other
quantized tensor (EXL2) the ``nbytes`` it reports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_IN_LAYER = re.compile(r"(?:^|\.)(?:blk|layers)\.\d+\.")


@dataclass(frozen=True)
class WeightBits:
    bits: int  # stored bits of the linear layers
    weights: int  # their number of weights

    @property
    def per_weight(self) -> float:
        return self.bits / self.weights if self.weights else float("nan")


def stored_bytes(tensor) -> int:
    """Bytes the checkpoint stores for one tensor (see the module docstring)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.numel() * tensor.element_size()
    data = getattr(tensor, "data", None)  # QuantizedTensor: the GGUF blocks
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    return int(tensor.nbytes)


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and _IN_LAYER.search(name) is not None


def linear_bits(checkpoint) -> WeightBits:
    """Read every tensor of ``checkpoint`` once and count its linear layers' bits."""
    bits = weights = 0
    for name, tensor in checkpoint.weights():
        shape = tuple(tensor.shape)
        if is_linear(name, shape):
            bits += 8 * stored_bytes(tensor)
            weights += math.prod(shape)
    return WeightBits(bits, weights)
