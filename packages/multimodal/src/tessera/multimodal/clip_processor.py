"""LLaVA-1.5's image processor (transformers' ``CLIPImageProcessor`` / ``LlavaImageProcessor``,
PIL backend): optional pad to square, resize of the shortest edge (bicubic), centre crop,
rescale, normalise with CLIP's mean and std."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tessera.formats import FormatError

from .content_hash import content_hash
from .pixel_ops import (
    PixelNormalization,
    center_crop,
    pad_to_square,
    resample_from_hf,
    resize,
    to_chw_uint8,
    to_rgb,
)
from .processed import ProcessedImage

PREPROCESSOR = "preprocessor_config.json"


@dataclass(frozen=True)
class ClipImageProcessor:
    """``size`` is ("shortest_edge", n) or ("height_width", (h, w)); ``crop_size`` (h, w) or None
    for no crop. ``patch_size`` and ``vision_feature_select_strategy`` come from the model: the
    CLIP tower adds a CLS token, which the "default" strategy drops."""

    patch_size: int
    size: tuple[str, int | tuple[int, int]] = ("shortest_edge", 336)
    crop_size: tuple[int, int] | None = (336, 336)
    do_resize: bool = True
    do_pad: bool = False
    resample: Image.Resampling = Image.Resampling.BICUBIC
    normalization: PixelNormalization = PixelNormalization()
    vision_feature_select_strategy: str = "default"

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise FormatError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                "expected 'default' or 'full'"
            )

    @classmethod
    def from_hf(cls, preprocessor_config: dict, model_config: dict) -> ClipImageProcessor:
        """From an HF folder's preprocessor_config.json and config.json (LLaVA's, with its
        ``vision_config``), as dicts."""
        pre = preprocessor_config
        vision = model_config.get("vision_config") or {}
        return cls(
            patch_size=int(vision.get("patch_size", 14)),
            size=_size_from_hf(pre.get("size", {"shortest_edge": 224})),
            crop_size=_crop_from_hf(pre.get("crop_size", 224)) if pre.get("do_center_crop", True) else None,
            do_resize=bool(pre.get("do_resize", True)),
            do_pad=bool(pre.get("do_pad", False)),
            resample=resample_from_hf(pre.get("resample"), Image.Resampling.BICUBIC, PREPROCESSOR),
            normalization=PixelNormalization.from_hf(pre),
            vision_feature_select_strategy=model_config.get("vision_feature_select_strategy", "default"),
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ClipImageProcessor:
        from tessera.formats.json_file import read_json_object

        folder = Path(folder)
        return cls.from_hf(read_json_object(folder / PREPROCESSOR), read_json_object(folder / "config.json"))

    @property
    def settings_key(self) -> str:
        return repr(self)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) of the pixel values for an input of ``width`` x ``height``."""
        if self.crop_size is not None:
            return self.crop_size
        if self.do_pad:
            width = height = max(width, height)
        return self._resized(height, width) if self.do_resize else (height, width)

    def num_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens for an input of ``width`` x ``height``: (336 / 14)^2 = 576 for
        LLaVA-1.5, one more with the "full" strategy, which keeps the CLS token."""
        return self._tokens_for_output(*self.output_size(width, height))

    def process_image(self, image: Image.Image) -> ProcessedImage:
        image = to_rgb(image)
        if self.do_pad:
            fill = tuple(int(m * 255) for m in self.normalization.mean)
            image = pad_to_square(image, fill)
        if self.do_resize:
            h, w = self._resized(image.height, image.width)
            image = resize(image, h, w, self.resample)
        if self.crop_size is not None:
            image = center_crop(image, *self.crop_size)
        pixels = self.normalization.apply(to_chw_uint8(image)).unsqueeze(0)
        return ProcessedImage(
            modality="image",
            pixel_values=pixels,
            grid_thw=None,
            num_tokens=self._tokens_for_output(image.height, image.width),
            content_hash=content_hash(pixels, None, self.settings_key),
        )

    def __call__(self, images: Sequence[Image.Image]) -> list[ProcessedImage]:
        return [self.process_image(image) for image in images]

    def _tokens_for_output(self, height: int, width: int) -> int:
        cls_token = 1 if self.vision_feature_select_strategy == "full" else 0
        return (height // self.patch_size) * (width // self.patch_size) + cls_token

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        kind, value = self.size
        if kind == "height_width":
            return value
        # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = value, int(value * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def _size_from_hf(size) -> tuple[str, int | tuple[int, int]]:
    if isinstance(size, int):  # an old config's int means the shortest edge for CLIP
        return ("shortest_edge", size)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return ("height_width", (int(size["height"]), int(size["width"])))
        if "shortest_edge" in size and "longest_edge" not in size:
            return ("shortest_edge", int(size["shortest_edge"]))
    raise FormatError(
        f"{PREPROCESSOR}: size {size!r} is not {{'shortest_edge': n}} nor {{'height', 'width'}}"
    )


def _crop_from_hf(crop) -> tuple[int, int]:
    if isinstance(crop, int):
        return (crop, crop)
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        return (int(crop["height"]), int(crop["width"]))
    raise FormatError(f"{PREPROCESSOR}: crop_size {crop!r} is not an int nor {{'height', 'width'}}")
