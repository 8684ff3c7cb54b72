"""Sampling a video's frames to a budget: evenly spread, an even count for Qwen2-VL's temporal
patch of 2, every frame when the budget allows."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tessera.multimodal import MediaError, load_video_frames, sample_frame_indices


def test_a_budget_of_four_out_of_ten_frames_takes_four_spread_from_the_first():
    assert sample_frame_indices(10, 4) == [0, 2, 5, 7]


def test_an_odd_number_of_frames_within_budget_drops_one_to_stay_even():
    assert sample_frame_indices(5, 16) == [0, 1, 2, 3]
    assert sample_frame_indices(1, 16) == [0]  # a processor repeats a lone frame


@given(st.integers(1, 500), st.integers(1, 64), st.sampled_from([1, 2, 4]))
def test_sampled_indices_are_increasing_within_budget_and_a_multiple(total, budget, multiple):
    idx = sample_frame_indices(total, budget, multiple)
    assert idx[0] == 0 and all(a < b for a, b in zip(idx, idx[1:], strict=False)) and idx[-1] < total
    assert len(idx) <= min(total, budget)
    assert len(idx) % multiple == 0 or len(idx) == min(total, budget) < multiple


def test_frames_of_different_sizes_are_refused():
    frames = [
        Image.new("RGB", (8, 8)),
        Image.new("RGB", (8, 8)),
        Image.new("RGB", (9, 8)),
        Image.new("RGB", (8, 8)),
    ]
    with pytest.raises(MediaError, match="differ in size"):
        load_video_frames(frames, max_frames=4)
    assert len(load_video_frames(frames[:2] + frames[3:], max_frames=4)) == 2
