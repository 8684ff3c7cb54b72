"""One processed image or video: what the vision encoder takes, and how many placeholder tokens
stand for it in the prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .content_hash import ContentHash


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    modality: str  # "image" | "video"
    # LLaVA: [1, 3, H, W]; Qwen2-VL: [t * h * w patches, C * temporal_patch * patch * patch]
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int] | None  # Qwen2-VL's (t, h, w) in patches; None for LLaVA
    num_tokens: int  # placeholder tokens in the prompt, one per encoder output row
    content_hash: ContentHash


def batch_pixel_values(items: Sequence[ProcessedImage]) -> torch.Tensor:
    """The encoder's input for ``items``, concatenated as transformers batches them."""
    return torch.cat([item.pixel_values for item in items], dim=0)


def batch_grid_thw(items: Sequence[ProcessedImage]) -> torch.Tensor:
    """[n, 3] int64, transformers' ``image_grid_thw`` / ``video_grid_thw``."""
    return torch.tensor([item.grid_thw for item in items], dtype=torch.int64).view(-1, 3)
