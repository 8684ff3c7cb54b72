"""Qwen2-VL's image and video processor (transformers' ``Qwen2VLImageProcessor``, PIL backend):
dynamic resolution (``smart_resize`` to a multiple of patch x merge within min/max pixels),
rescale and normalise, then patches flattened in the order the vision tower reads them.

An image is one temporal patch: its frame repeated ``temporal_patch_size`` times. A video's
frames go in groups of ``temporal_patch_size`` (the last frame repeated to fill a group), one
resize for all frames, as transformers' video processor does (which resizes with torchvision;
here PIL, as for images).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from tessera.formats import FormatError

from .content_hash import content_hash
from .errors import MediaError
from .pixel_ops import PixelNormalization, resample_from_hf, resize, to_chw_uint8, to_rgb
from .processed import ProcessedImage

PREPROCESSOR = "preprocessor_config.json"
IMAGE_PIXELS = (56 * 56, 28 * 28 * 1280)  # transformers' defaults (min, max) for images
VIDEO_PIXELS = (128 * 28 * 28, 28 * 28 * 768)  # and for video frames
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), both multiples of ``factor``, close to the input's aspect ratio, with an
    area within [min_pixels, max_pixels] (transformers' ``smart_resize``)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(
            f"image of {width}x{height}: aspect ratio {max(height, width) / min(height, width):.0f} "
            f"exceeds {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int):
    """[F, C, H, W] frames to ([t * h * w, C * T * P * P] patches, (t, h, w)), the rows ordered
    by temporal group, then merge window (row-major), then position inside the window; each row
    is channel, frame of the group, pixel row, pixel column."""
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    f, c, height, width = frames.shape
    t, h, w, m, p = (
        f // temporal_patch_size,
        height // patch_size,
        width // patch_size,
        merge_size,
        patch_size,
    )
    x = frames.reshape(t, temporal_patch_size, c, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * temporal_patch_size * p * p), (t, h, w)


@dataclass(frozen=True)
class Qwen2VLImageProcessor:
    min_pixels: int = IMAGE_PIXELS[0]
    max_pixels: int = IMAGE_PIXELS[1]
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    resample: Image.Resampling = Image.Resampling.BICUBIC
    normalization: PixelNormalization = PixelNormalization()

    @classmethod
    def from_hf(cls, preprocessor_config: dict, *, video: bool = False) -> Qwen2VLImageProcessor:
        """From preprocessor_config.json (or video_preprocessor_config.json with ``video``, whose
        defaults for min/max pixels differ), as a dict; ``min_pixels``/``max_pixels`` override
        ``size``'s ``shortest_edge``/``longest_edge``, as in transformers."""
        pre = preprocessor_config
        size = pre.get("size") or {}
        if not isinstance(size, dict):
            raise FormatError(f"{PREPROCESSOR}: size {size!r} should be {{'shortest_edge', 'longest_edge'}}")
        default_min, default_max = VIDEO_PIXELS if video else IMAGE_PIXELS
        min_pixels = pre.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", default_min)))
        max_pixels = pre.get("max_pixels", size.get("longest_edge", size.get("max_pixels", default_max)))
        out = cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(pre.get("patch_size", 14)),
            temporal_patch_size=int(pre.get("temporal_patch_size", 2)),
            merge_size=int(pre.get("merge_size", 2)),
            resample=resample_from_hf(pre.get("resample"), Image.Resampling.BICUBIC, PREPROCESSOR),
            normalization=PixelNormalization.from_hf(pre),
        )
        if not 0 < out.min_pixels <= out.max_pixels:
            raise FormatError(f"{PREPROCESSOR}: min_pixels {out.min_pixels} and max_pixels {out.max_pixels}")
        return out

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, video: bool = False) -> Qwen2VLImageProcessor:
        """From an HF folder; with ``video``, its video_preprocessor_config.json if it has one."""
        from tessera.formats.json_file import read_json_object

        folder = Path(folder)
        path = folder / "video_preprocessor_config.json"
        return cls.from_hf(
            read_json_object(path if video and path.exists() else folder / PREPROCESSOR), video=video
        )

    @property
    def settings_key(self) -> str:
        return repr(self)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid_thw(self, width: int, height: int, num_frames: int = 1) -> tuple[int, int, int]:
        """(t, h, w) in patches for ``num_frames`` frames of ``width`` x ``height``."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return (-(-num_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size)

    def num_tokens(self, width: int, height: int, num_frames: int = 1) -> int:
        """Placeholder tokens: one per merged patch, t * h * w / merge^2."""
        return math.prod(self.grid_thw(width, height, num_frames)) // self.merge_size**2

    def process_image(self, image: Image.Image) -> ProcessedImage:
        return self._process([image], "image")

    def process_video(self, frames: Sequence[Image.Image]) -> ProcessedImage:
        """One video from its (already sampled) frames, all of one size."""
        if not frames:
            raise MediaError("a video needs at least one frame")
        if len({f.size for f in frames}) > 1:
            raise MediaError("video frames differ in size; every frame must have the same size")
        return self._process(frames, "video")

    def __call__(self, images: Sequence[Image.Image]) -> list[ProcessedImage]:
        return [self.process_image(image) for image in images]

    def _process(self, frames: Sequence[Image.Image], modality: str) -> ProcessedImage:
        width, height = frames[0].size
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        chw = torch.stack([to_chw_uint8(resize(to_rgb(f), h, w, self.resample)) for f in frames])
        patches, grid = patchify(
            self.normalization.apply(chw), self.patch_size, self.merge_size, self.temporal_patch_size
        )
        return ProcessedImage(
            modality=modality,
            pixel_values=patches,
            grid_thw=grid,
            num_tokens=math.prod(grid) // self.merge_size**2,
            content_hash=content_hash(patches, grid, f"{modality} {self.settings_key}"),
        )
