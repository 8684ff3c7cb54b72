"""Qwen2-VL's processor against transformers' Qwen2VLImageProcessorPil (the PIL backend): pixel
values and image_grid_thw equal bit for bit (tolerance 0: the same PIL resize on the same uint8
pixels, numpy's rescale/normalise arithmetic repeated elementwise, patches only moved).

transformers' video processor needs torchvision (not installed here) and resizes with it, so
video is checked against the image processor frame by frame, in the temporal layout of
Qwen2VLVideoProcessor.patchify (its view/permute copied below)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.multimodal import MediaError, Qwen2VLImageProcessor, batch_grid_thw, batch_pixel_values, patchify

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

# Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json
QWEN2_VL_2B = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
SMALL_MAX = {**QWEN2_VL_2B, "max_pixels": 28 * 28 * 16}  # large images scale down
NEW_STYLE = {k: v for k, v in SMALL_MAX.items() if k not in ("min_pixels", "max_pixels")} | {
    "size": {"shortest_edge": 56 * 56 * 2, "longest_edge": 28 * 28 * 30},
    "resample": 2,
}

SIZES = [(57, 83), (5, 5), (1000, 30), (224, 224), (333, 129)]  # (width, height)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(config: dict, images) -> dict:
    return Qwen2VLImageProcessorPil(**config)(images=images, return_tensors="pt")


@pytest.mark.parametrize(
    "config", [QWEN2_VL_2B, SMALL_MAX, NEW_STYLE], ids=["qwen2-vl-2b", "small-max", "size-dict"]
)
def test_pixel_values_and_grid_equal_transformers_pil_processor(config):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    want = reference(config, images)
    items = Qwen2VLImageProcessor.from_hf(config)(images)
    got = batch_pixel_values(items)
    assert got.dtype == want["pixel_values"].dtype == torch.float32
    assert got.shape == want["pixel_values"].shape
    assert torch.equal(got, want["pixel_values"])
    assert torch.equal(batch_grid_thw(items), want["image_grid_thw"])


def test_token_counts_are_merged_patches_and_match_transformers_patch_count():
    ref = Qwen2VLImageProcessorPil(**SMALL_MAX)
    processor = Qwen2VLImageProcessor.from_hf(SMALL_MAX)
    for w, h in SIZES:
        item = processor.process_image(random_image(w, h))
        t, gh, gw = item.grid_thw
        assert t == 1 and item.num_tokens == gh * gw // 4 == processor.num_tokens(w, h)
        assert ref.get_number_of_image_patches(h, w) == gh * gw == item.pixel_values.shape[0]


def test_an_image_is_its_frame_repeated_over_the_temporal_patch():
    item = Qwen2VLImageProcessor.from_hf(SMALL_MAX).process_image(random_image(60, 40))
    rows = item.pixel_values.view(-1, 3, 2, 14 * 14)
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])


def video_patchify_as_transformers(videos: torch.Tensor, p: int, m: int, tp: int) -> torch.Tensor:
    """Qwen2VLVideoProcessor.patchify of transformers 5.24, for [B, F, C, H, W] with F % tp == 0."""
    b, f, c, h, w = videos.shape
    gt, gh, gw = f // tp, h // p, w // p
    x = videos.view(b, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b, gt * gh * gw, c * tp * p * p)


def test_patchify_of_frames_equals_transformers_video_patchify():
    frames = torch.randn(4, 3, 56, 84)
    got, grid = patchify(frames, 14, 2, 2)
    assert grid == (2, 4, 6)
    assert torch.equal(got, video_patchify_as_transformers(frames[None], 14, 2, 2)[0])


@pytest.mark.parametrize("num_frames", [4, 3])
def test_a_video_is_each_frame_as_transformers_processes_it_in_temporal_pairs(num_frames):
    frames = [random_image(90, 61, seed=k) for k in range(num_frames)]
    item = Qwen2VLImageProcessor.from_hf(SMALL_MAX).process_video(frames)
    per_frame = [reference(SMALL_MAX, [f]) for f in frames]
    _, gh, gw = per_frame[0]["image_grid_thw"][0].tolist()
    assert item.modality == "video" and item.grid_thw == (2, gh, gw)
    assert item.num_tokens == 2 * gh * gw // 4
    got = item.pixel_values.view(2, gh * gw, 3, 2, 14 * 14)
    for k in range(4):
        src = per_frame[min(k, num_frames - 1)]["pixel_values"]  # 3 frames: the last is repeated
        assert torch.equal(got[k // 2, :, :, k % 2], src.view(gh * gw, 3, 2, 14 * 14)[:, :, 0])


def test_video_defaults_differ_from_image_defaults_as_in_transformers():
    config = {k: v for k, v in QWEN2_VL_2B.items() if k not in ("min_pixels", "max_pixels")}
    assert Qwen2VLImageProcessor.from_hf(config).max_pixels == 28 * 28 * 1280
    assert Qwen2VLImageProcessor.from_hf(config, video=True).min_pixels == 128 * 28 * 28
    assert Qwen2VLImageProcessor.from_hf(QWEN2_VL_2B, video=True).max_pixels == 12845056


def test_an_aspect_ratio_over_200_is_a_media_error():
    with pytest.raises(MediaError, match="aspect ratio 250 exceeds 200"):
        Qwen2VLImageProcessor().process_image(random_image(500, 2))


def test_video_frames_of_different_sizes_are_refused():
    with pytest.raises(MediaError, match="differ in size"):
        Qwen2VLImageProcessor().process_video([random_image(56, 56), random_image(57, 56)])


def test_from_folder_reads_the_preprocessor_config_and_for_video_its_own_file(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SMALL_MAX))
    assert Qwen2VLImageProcessor.from_folder(tmp_path) == Qwen2VLImageProcessor.from_hf(SMALL_MAX)
    assert Qwen2VLImageProcessor.from_folder(tmp_path, video=True).max_pixels == 28 * 28 * 16
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({**SMALL_MAX, "max_pixels": 28 * 28 * 8})
    )
    assert Qwen2VLImageProcessor.from_folder(tmp_path, video=True).max_pixels == 28 * 28 * 8
