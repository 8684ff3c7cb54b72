"""The content hash of a processed image: the key of the encoder cache, and what enters the
prefix-cache block hash so that equal placeholder tokens over different images never share KV."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

ContentHash = bytes  # a sha256 digest, 32 bytes; ``.hex()`` for logs and metrics


def content_hash(pixel_values: torch.Tensor, grid_thw: Sequence[int] | None, settings: str) -> ContentHash:
    """sha256 over the processor's settings, the grid, the dtype and shape, and the pixel bytes."""
    h = hashlib.sha256()
    h.update(settings.encode())
    h.update(repr((tuple(grid_thw) if grid_thw is not None else None, str(pixel_values.dtype))).encode())
    h.update(repr(tuple(pixel_values.shape)).encode())
    pixels = pixel_values.detach().cpu().contiguous()
    h.update(pixels.view(torch.uint8).numpy() if pixels.numel() else b"")
    return h.digest()
