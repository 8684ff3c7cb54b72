"""A video as a list of frames, sampled uniformly to the model's frame budget.

Qwen2-VL encodes frames in pairs (``temporal_patch_size`` 2), so a sampled count is kept a
multiple of it; a processor repeats the last frame of an odd remainder, as transformers does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from PIL import Image

from .errors import MediaError
from .image_source import ImageSource, load_image

T = TypeVar("T")


def sample_frame_indices(num_frames: int, max_frames: int, multiple: int = 2) -> list[int]:
    """Indices of at most ``max_frames`` of ``num_frames`` frames, evenly spread from frame 0; the
    count is a multiple of ``multiple`` unless fewer frames than that exist."""
    if num_frames <= 0:
        raise MediaError("a video needs at least one frame")
    if max_frames < 1 or multiple < 1:
        raise ValueError(f"max_frames ({max_frames}) and multiple ({multiple}) must be positive")
    n = min(num_frames, max_frames)
    if n >= multiple:
        n -= n % multiple
    return [i * num_frames // n for i in range(n)]


def sample_frames(frames: Sequence[T], max_frames: int, multiple: int = 2) -> list[T]:
    return [frames[i] for i in sample_frame_indices(len(frames), max_frames, multiple)]


def load_video_frames(
    frames: Sequence[ImageSource], *, max_frames: int, multiple: int = 2, **load_kwargs
) -> list[Image.Image]:
    """The sampled frames of a video given as a list of image sources (each read by ``load_image``
    with ``load_kwargs``; only the sampled ones are read). All frames must share one size."""
    images = [load_image(f, **load_kwargs) for f in sample_frames(frames, max_frames, multiple)]
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise MediaError(f"video frames differ in size ({listed}); every frame must have the same size")
    return images
