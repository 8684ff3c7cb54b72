"""The steps of an HF image processor, done with the same PIL calls and the same float arithmetic
as transformers' PIL backend, so that their outputs are bit-identical."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tessera.formats import FormatError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' ``convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize(image: Image.Image, height: int, width: int, resample: Image.Resampling) -> Image.Image:
    if image.size == (width, height):
        return image  # PIL would return a copy of the same pixels
    return image.resize((width, height), resample=resample)


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of colour ``fill`` (LLaVA's ``do_pad``)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """The centre ``height`` x ``width``; an image smaller than that is padded with zeros, the
    offsets rounding down as transformers' ``center_crop`` does."""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    top, left = (h - height) // 2, (w - width) // 2
    return image.crop((left, top, left + width, top + height))  # outside the image reads as 0


def to_chw_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


@dataclass(frozen=True)
class PixelNormalization:
    """``rescale`` then ``normalize`` of an HF image processor, in its order and precision:
    the rescale in float64 rounded to float32, the normalisation in float32."""

    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_hf(cls, config: dict, name: str = "preprocessor_config.json") -> PixelNormalization:
        mean = _three_floats(config.get("image_mean", OPENAI_CLIP_MEAN), "image_mean", name)
        std = _three_floats(config.get("image_std", OPENAI_CLIP_STD), "image_std", name)
        if any(s == 0 for s in std):
            raise FormatError(f"{name}: image_std {std} has a zero")
        return cls(
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            mean=mean,
            std=std,
        )

    def apply(self, chw: torch.Tensor) -> torch.Tensor:
        """float32 pixels from uint8 [..., 3, H, W]."""
        x = chw.double().mul_(self.rescale_factor).float() if self.do_rescale else chw.float()
        if self.do_normalize:
            shape = (3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
            std = torch.tensor(self.std, dtype=torch.float32).view(shape)
            x = (x - mean) / std
        return x


def resample_from_hf(value, default: Image.Resampling, name: str) -> Image.Resampling:
    if value is None:
        return default
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError) as e:
        raise FormatError(f"{name}: resample {value!r} is not a PIL resampling filter (0-5)") from e


def _three_floats(value, key: str, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise FormatError(f"{name}: {key} should be three numbers (one per RGB channel), got {value!r}")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{name}: {key} should be three numbers, got {value!r}") from e
