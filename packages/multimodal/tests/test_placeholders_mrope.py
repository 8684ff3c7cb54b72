"""Placeholder expansion, and Qwen2-VL's M-RoPE positions against transformers'
Qwen2VLModel.get_rope_index on a random tiny model: one image, two images of different sizes, a
4-frame video, and images with a video."""

from __future__ import annotations

import pytest
import torch

from tessera.multimodal import MediaError, PlaceholderRange, expand_placeholders, mrope_positions

IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653


def test_each_placeholder_becomes_its_items_count_and_the_ranges_say_where():
    ids, ranges = expand_placeholders([1, IMAGE, 2, IMAGE, 3], {IMAGE: [3, 2]})
    assert ids == [1, IMAGE, IMAGE, IMAGE, 2, IMAGE, IMAGE, 3]
    assert ranges == {IMAGE: [PlaceholderRange(1, 3), PlaceholderRange(5, 2)]}


def test_images_and_videos_expand_in_prompt_order_each_from_its_own_list():
    ids, ranges = expand_placeholders([VIDEO, 9, IMAGE, VIDEO], {IMAGE: [1], VIDEO: [2, 3]})
    assert ids == [VIDEO] * 2 + [9, IMAGE] + [VIDEO] * 3
    assert ranges[VIDEO] == [PlaceholderRange(0, 2), PlaceholderRange(4, 3)]
    assert ranges[IMAGE] == [PlaceholderRange(3, 1)]


@pytest.mark.parametrize(
    ("prompt", "counts"), [([1, IMAGE], {IMAGE: [4, 4]}), ([IMAGE, IMAGE], {IMAGE: [4]})]
)
def test_a_placeholder_count_that_differs_from_the_items_is_a_media_error(prompt, counts):
    with pytest.raises(MediaError, match="placeholder token"):
        expand_placeholders(prompt, counts)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    config = transformers.Qwen2VLConfig(
        text_config={
            "vocab_size": 151700,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        },
        vision_config={
            "depth": 1,
            "embed_dim": 16,
            "hidden_size": 16,
            "num_heads": 2,
            "spatial_merge_size": 2,
        },
    )
    with torch.device("meta"):
        return Qwen2VLModel(config)


def build_prompt(parts):
    """parts: ints (text tokens), ("image" | "video", (t, h, w)). Returns our ids, ranges and
    grids, and transformers' inputs (mm_token_type_ids 1 for image tokens, 2 for video)."""
    ids, types, vision, images, videos = [], [], [], [], []
    for part in parts:
        if isinstance(part, int):
            ids += [100 + part] * 1
            types += [0]
            continue
        kind, grid = part
        n = grid[0] * grid[1] * grid[2] // 4
        ids += [START]
        types += [0]
        vision.append((PlaceholderRange(len(ids), n), grid))
        ids += [IMAGE if kind == "image" else VIDEO] * n + [END]
        types += [1 if kind == "image" else 2] * n + [0]
        (images if kind == "image" else videos).append(grid)
    as_grid = lambda g: torch.tensor(g, dtype=torch.int64).view(-1, 3) if g else None  # noqa: E731
    return ids, vision, torch.tensor([ids]), torch.tensor([types]), as_grid(images), as_grid(videos)


CASES = {
    "one image": [1, 2, ("image", (1, 6, 8)), 3, 4, 5],
    "two images of different sizes": [1, ("image", (1, 4, 4)), 2, 3, ("image", (1, 10, 6)), 4],
    "4-frame video": [1, 2, 3, ("video", (2, 8, 6)), 4, 5],
    "images and a video": [("image", (1, 2, 12)), 7, ("video", (2, 4, 4)), 8, ("image", (1, 6, 2))],
    "ending on an image": [1, ("image", (1, 4, 6))],
}


@pytest.mark.parametrize("parts", CASES.values(), ids=CASES.keys())
def test_positions_and_delta_equal_transformers_get_rope_index(hf_model, parts):
    ids, vision, input_ids, types, image_grid, video_grid = build_prompt(parts)
    want, want_delta = hf_model.get_rope_index(
        input_ids, mm_token_type_ids=types, image_grid_thw=image_grid, video_grid_thw=video_grid
    )
    got, delta = mrope_positions(len(ids), vision, spatial_merge_size=2)
    assert torch.equal(got, want[:, 0]) and delta == want_delta.item()


def test_text_after_a_long_low_resolution_video_continues_after_its_largest_temporal_position():
    # 8 temporal groups on a 2 x 2 merged grid: Qwen2-VL's original get_rope_index (and vLLM)
    # continue from the largest position in the run + 1 (start + 8), which we follow;
    # transformers 5.24 continues from start + max(h, w) / merge = start + 2, overlapping the run
    got, delta = mrope_positions(1 + 32 + 1, [(PlaceholderRange(1, 32), (8, 4, 4))], spatial_merge_size=2)
    assert got[0, 1:33].max() == 1 + 7
    assert got[:, 33].tolist() == [9, 9, 9] and delta == 10 - 34


def test_a_run_whose_length_is_not_its_grid_is_a_media_error():
    with pytest.raises(MediaError, match="grid of 1x4x4"):
        mrope_positions(10, [(PlaceholderRange(1, 5), (1, 4, 4))], spatial_merge_size=2)
