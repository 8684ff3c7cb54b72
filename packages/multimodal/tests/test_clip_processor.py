"""LLaVA-1.5's processor against transformers' CLIPImageProcessorPil and LlavaImageProcessorPil
(the PIL backend, what ``use_fast=False`` gives): pixel values equal bit for bit (tolerance 0),
since the same PIL resize runs on the same uint8 pixels and rescale/normalise repeat numpy's
float64-then-float32 arithmetic elementwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.formats import FormatError
from tessera.multimodal import ClipImageProcessor

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402

# llava-hf/llava-1.5-7b-hf's preprocessor_config.json and the parts of its config.json we read
LLAVA_15 = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
LLAVA_15_MODEL = {
    "vision_config": {"patch_size": 14, "image_size": 336},
    "vision_feature_select_strategy": "default",
}
TINY = {**LLAVA_15, "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}}
PADDED = {**TINY, "do_pad": True}
# a fixed resize smaller than the crop in height: the crop pads with zeros
FIXED_SMALL = {**TINY, "size": {"height": 20, "width": 45}, "crop_size": {"height": 24, "width": 24}}
NO_CROP = {**TINY, "do_center_crop": False, "resample": 2, "image_mean": 0.5, "image_std": 0.5}

SIZES = [(336, 336), (17, 500), (1, 1), (3, 2), (1000, 37), (641, 479)]  # (width, height)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def reference(config: dict, cls, images) -> torch.Tensor:
    return cls(**config)(images=images, return_tensors="pt")["pixel_values"]


def ours(config: dict, images, model: dict = LLAVA_15_MODEL) -> torch.Tensor:
    processor = ClipImageProcessor.from_hf(config, model)
    return torch.cat([item.pixel_values for item in processor(images)])


@pytest.mark.parametrize(
    ("config", "cls"),
    [
        (LLAVA_15, CLIPImageProcessorPil),
        (TINY, CLIPImageProcessorPil),
        (PADDED, LlavaImageProcessorPil),
        (FIXED_SMALL, CLIPImageProcessorPil),
    ],
    ids=["llava-1.5", "tiny-32", "llava-do_pad", "crop-pads"],
)
def test_pixel_values_equal_transformers_pil_processor_on_odd_tiny_and_wide_images(config, cls):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    want = reference(config, cls, images)
    got = ours(config, images)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)


def test_without_a_crop_each_image_keeps_its_resized_shape_and_equals_transformers():
    for w, h in [(50, 33), (7, 90), (32, 32)]:
        image = random_image(w, h)
        want = reference(NO_CROP, CLIPImageProcessorPil, [image])
        assert torch.equal(ours(NO_CROP, [image]), want)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_alpha_grey_and_palette_images_convert_to_rgb_as_transformers_does(mode):
    image = random_image(45, 31, "RGBA" if mode != "L" else "L")
    if mode == "P":
        image = image.convert("RGB").quantize(16)
        image.info["transparency"] = 3
    want = reference(TINY, CLIPImageProcessorPil, [image])
    assert torch.equal(ours(TINY, [image]), want)


def test_llava_15_takes_576_tokens_per_image_with_the_default_strategy_and_577_with_full():
    processor = ClipImageProcessor.from_hf(LLAVA_15, LLAVA_15_MODEL)
    item = processor.process_image(random_image(500, 17))
    assert item.num_tokens == processor.num_tokens(500, 17) == (336 // 14) ** 2 == 576
    assert item.grid_thw is None and item.pixel_values.shape == (1, 3, 336, 336)
    full = ClipImageProcessor.from_hf(LLAVA_15, {**LLAVA_15_MODEL, "vision_feature_select_strategy": "full"})
    assert full.num_tokens(500, 17) == 577


def test_token_count_matches_transformers_llava_processor_arithmetic():
    # LlavaProcessor: (h // patch) * (w // patch) + num_additional_image_tokens (1, the CLS), minus
    # one for "default"
    processor = ClipImageProcessor.from_hf(TINY, {"vision_config": {"patch_size": 8}})
    assert processor.num_tokens(100, 60) == (32 // 8) * (32 // 8) + 1 - 1


def test_equal_images_hash_equal_and_different_pixels_or_settings_hash_differently():
    processor = ClipImageProcessor.from_hf(TINY, LLAVA_15_MODEL)
    a, b = random_image(40, 40, seed=1), random_image(40, 40, seed=2)
    assert processor.process_image(a).content_hash == processor.process_image(a.copy()).content_hash
    assert processor.process_image(a).content_hash != processor.process_image(b).content_hash
    other = ClipImageProcessor.from_hf({**TINY, "image_mean": 0.5}, LLAVA_15_MODEL)
    assert other.process_image(a).content_hash != processor.process_image(a).content_hash


def test_a_size_it_cannot_read_is_a_format_error_naming_the_file():
    with pytest.raises(FormatError, match="preprocessor_config.json: size"):
        ClipImageProcessor.from_hf({"size": {"longest_edge": 3}}, LLAVA_15_MODEL)
    with pytest.raises(FormatError, match="image_mean"):
        ClipImageProcessor.from_hf({**TINY, "image_mean": [0.5, 0.5]}, LLAVA_15_MODEL)


def test_from_folder_reads_preprocessor_config_and_config_json(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA_15))
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_15_MODEL))
    assert ClipImageProcessor.from_folder(tmp_path) == ClipImageProcessor.from_hf(LLAVA_15, LLAVA_15_MODEL)
