"""Images in the step: each input's encoder runs once, before the first step whose tokens touch
its placeholders, within the per-step encoder budget; its content hash keys the prefix cache."""

import msgspec
import pytest

from tessera.kvcache import KVCacheManager
from tessera.scheduler import (
    ModelRunnerOutput,
    MultiModalFeature,
    Request,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    block_extra_keys,
)

IMG = 99  # the placeholder token


def make(num_blocks=64, block_size=4, max_model_len=64, **kw):
    return Scheduler(
        SchedulerConfig(max_model_len=max_model_len, **kw), KVCacheManager(num_blocks, block_size)
    )


def prompt_with(*runs) -> tuple[list[int], list[MultiModalFeature]]:
    """Text tokens and image runs: ints are text lengths, (length, identifier) an image."""
    ids, feats = [], []
    for r in runs:
        if isinstance(r, int):
            ids += [1 + (len(ids) + k) % 50 for k in range(r)]
        else:
            feats.append(MultiModalFeature(len(ids), r[0], r[1]))
            ids += [IMG] * r[0]
    return ids, feats


def step(s: Scheduler):
    so = s.schedule()
    sampled = {
        rid: [7]
        for rid, n in so.num_scheduled_tokens.items()
        if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens
    }
    s.update_from_output(so, ModelRunnerOutput(sampled))
    return so


def test_an_image_is_encoded_once_before_its_first_chunk_even_when_chunks_split_it():
    s = make(max_num_batched_tokens=6, max_num_encoder_input_tokens=16)
    ids, feats = prompt_with(4, (8, "a"), 3)  # placeholders at 4..11
    s.add_request(Request("r", ids, max_tokens=1, mm_features=feats))
    first = step(s)  # tokens 0..5: touches the image
    assert first.num_scheduled_tokens == {"r": 6} and first.scheduled_encoder_inputs == {"r": [0]}
    assert first.new_requests[0].mm_features == feats
    second = step(s)  # 6..11: the rest of the image, already encoded
    assert second.num_scheduled_tokens == {"r": 6} and second.scheduled_encoder_inputs == {}
    third = step(s)
    assert third.num_scheduled_tokens == {"r": 3} and not s.has_unfinished_requests()


def test_text_before_an_image_runs_without_its_encoder():
    s = make(max_num_batched_tokens=4)
    ids, feats = prompt_with(4, (4, "a"))
    s.add_request(Request("r", ids, max_tokens=1, mm_features=feats))
    assert step(s).scheduled_encoder_inputs == {}
    assert step(s).scheduled_encoder_inputs == {"r": [0]}


def test_the_encoder_budget_stops_a_chunk_before_the_image_that_does_not_fit():
    s = make(max_num_batched_tokens=64, max_num_encoder_input_tokens=10)
    a_ids, a_feats = prompt_with(2, (8, "a"), 2)
    b_ids, b_feats = prompt_with(3, (6, "b"), 1)
    s.add_request(Request("a", a_ids, max_tokens=2, mm_features=a_feats))
    s.add_request(Request("b", b_ids, max_tokens=2, mm_features=b_feats))
    so = step(s)
    # a's 8 encoder tokens fit; b's 6 do not (10 - 8): b runs its 3 text tokens only
    assert so.num_scheduled_tokens == {"a": 12, "b": 3}
    assert so.scheduled_encoder_inputs == {"a": [0]}
    so = step(s)
    assert so.num_scheduled_tokens == {"a": 1, "b": 7} and so.scheduled_encoder_inputs == {"b": [0]}


def test_a_waiting_request_whose_first_token_is_an_image_waits_for_the_budget():
    s = make(max_num_encoder_input_tokens=8)
    a_ids, a_feats = prompt_with((8, "a"), 1)
    b_ids, b_feats = prompt_with((8, "b"), 1)
    s.add_request(Request("a", a_ids, max_tokens=3, mm_features=a_feats))
    s.add_request(Request("b", b_ids, max_tokens=3, mm_features=b_feats))
    so = step(s)
    assert so.num_scheduled_tokens == {"a": 9} and so.scheduled_encoder_inputs == {"a": [0]}
    so = step(s)
    assert so.num_scheduled_tokens == {"a": 1, "b": 9} and so.scheduled_encoder_inputs == {"b": [0]}


def test_an_input_beyond_the_encoder_budget_is_refused_at_admission():
    s = make(max_num_encoder_input_tokens=8)
    ids, feats = prompt_with((9, "big"), 1)
    with pytest.raises(ValueError, match="needs 9 encoder tokens, more than max_num_encoder_input_tokens"):
        s.add_request(Request("r", ids, max_tokens=1, mm_features=feats))
    assert not s.has_unfinished_requests()


@pytest.mark.parametrize(
    "feats, why",
    [
        ([MultiModalFeature(2, 4, "a"), MultiModalFeature(4, 2, "b")], "after the previous"),
        ([MultiModalFeature(8, 4, "a")], "inside the 10-token prompt"),
        ([MultiModalFeature(3, 0, "a")], "non-empty"),
    ],
)
def test_placeholder_runs_out_of_order_overlapping_or_outside_the_prompt_are_refused(feats, why):
    with pytest.raises(ValueError, match=why):
        Request("r", list(range(10)), max_tokens=1, mm_features=feats)


def test_same_placeholders_different_images_share_only_the_blocks_before_the_image():
    s = make(block_size=4)
    ids, feats_a = prompt_with(8, (8, "img-a"), 8)  # blocks 0-1 text, 2-3 image, 4-5 text
    _, feats_b = prompt_with(8, (8, "img-b"), 8)
    s.add_request(Request("a", ids, max_tokens=1, mm_features=feats_a))
    while s.has_unfinished_requests():
        step(s)
    s.add_request(Request("b", ids, max_tokens=1, mm_features=feats_b))
    so = step(s)
    assert so.new_requests[0].num_computed_tokens == 8  # the two text blocks, not the image's
    assert so.scheduled_encoder_inputs == {"b": [0]}
    while s.has_unfinished_requests():
        step(s)
    s.add_request(Request("c", ids, max_tokens=1, mm_features=feats_a))
    so = step(s)
    # the same image: everything but the last token is cached, and no encoder runs
    assert so.new_requests[0].num_computed_tokens == 20 and so.scheduled_encoder_inputs == {}


def test_a_preempted_request_has_its_images_encoded_again_when_it_resumes():
    s = make(num_blocks=8, block_size=4, max_model_len=32, max_num_batched_tokens=32)
    s.add_request(Request("b", list(range(1, 17)), max_tokens=20))  # first: the victim is "a"
    step(s)
    a_ids, a_feats = prompt_with(2, (4, "a"), 2)
    s.add_request(Request("a", a_ids, max_tokens=20, mm_features=a_feats))
    encoded = 0
    for _ in range(60):
        if not s.has_unfinished_requests():
            break
        encoded += "a" in step(s).scheduled_encoder_inputs
    assert s.num_preemptions >= 1 and encoded == 2


def test_block_extra_keys_name_every_input_a_block_overlaps():
    feats = [MultiModalFeature(2, 3, "x"), MultiModalFeature(5, 4, "y")]
    assert block_extra_keys(feats, 12, 4) == [("x",), ("x", "y"), ("y",)]
    assert block_extra_keys(feats, 14, 4) == [("x",), ("x", "y"), ("y",), None]
    assert block_extra_keys([], 12, 4) is None


def test_the_step_with_encoder_inputs_crosses_a_process_boundary_as_bytes():
    s = make()
    ids, feats = prompt_with(2, (4, "a"))
    s.add_request(Request("r", ids, max_tokens=1, mm_features=feats))
    so = s.schedule()
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(so), type=SchedulerOutput) == so
