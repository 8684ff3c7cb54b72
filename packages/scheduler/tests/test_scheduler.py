"""The step loop's bookkeeping with a fake model: arrivals, aborts, tiny memory."""

import random

import msgspec
import pytest

from tessera.kvcache import KVCacheManager
from tessera.scheduler import (
    IllegalTransition,
    ModelRunnerOutput,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)


def make(num_blocks=64, block_size=4, max_model_len=64, **kw):
    return Scheduler(
        SchedulerConfig(max_model_len=max_model_len, **kw), KVCacheManager(num_blocks, block_size)
    )


def fake_step(s: Scheduler, token: int = 7):
    """Run one step; every request that caught up with its tokens samples ``token``."""
    so = s.schedule()
    sampled = {}
    for rid, n in so.num_scheduled_tokens.items():
        req = s.requests[rid]
        if req.num_computed_tokens + n == req.num_tokens:
            sampled[rid] = [token]
    return so, s.update_from_output(so, ModelRunnerOutput(sampled))


def test_several_requests_run_in_one_step():
    s = make()
    for i in range(3):
        s.add_request(Request(f"r{i}", [10 * i + k for k in range(5 + i)], max_tokens=2))
    so, outs = fake_step(s)
    assert so.num_scheduled_tokens == {"r0": 5, "r1": 6, "r2": 7}
    assert [o.new_token_ids for o in outs] == [[7], [7], [7]]
    so, outs = fake_step(s)
    assert so.num_scheduled_tokens == {"r0": 1, "r1": 1, "r2": 1}
    assert all(o.finish_reason == "length" for o in outs)
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == 64


def test_scheduler_output_crosses_a_process_boundary_as_bytes():
    s = make()
    s.add_request(Request("a", [1, 2, 3], max_tokens=2))
    so = s.schedule()
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(so), type=SchedulerOutput)
    assert back == so


def test_long_prompts_are_split_across_steps_under_the_token_budget():
    s = make(max_num_batched_tokens=8)
    s.add_request(Request("a", list(range(20)), max_tokens=1))
    counts = []
    while s.has_unfinished_requests():
        so, _ = fake_step(s)
        counts.append(so.num_scheduled_tokens["a"])
    assert counts == [8, 8, 4]


def test_eos_stops_only_after_min_tokens_and_stop_ids_stop():
    s = make()
    s.add_request(Request("a", [1], max_tokens=10, min_tokens=2, eos_token_ids=[7]))
    s.add_request(Request("b", [1], max_tokens=10, stop_token_ids=[7]))
    s.add_request(Request("c", [1], max_tokens=3, eos_token_ids=[7], ignore_eos=True))
    finished = {}
    while s.has_unfinished_requests():
        _, outs = fake_step(s)
        for o in outs:
            if o.finish_reason:
                finished[o.request_id] = (o.finish_reason, o.stop_reason)
    assert finished == {"a": ("stop", None), "b": ("stop", 7), "c": ("length", None)}


def test_prompt_over_the_context_is_refused_before_anything_changes():
    s = make(max_model_len=16)
    with pytest.raises(ValueError, match="17 tokens, more than the maximum context length of 16"):
        s.add_request(Request("a", [1] * 17, max_tokens=1))
    assert not s.requests and not s.waiting and s.kv.num_free_blocks == 64


def test_generation_stops_at_the_context_length():
    s = make(max_model_len=8)
    s.add_request(Request("a", [1] * 6, max_tokens=100))
    outs = []
    while s.has_unfinished_requests():
        outs += fake_step(s)[1]
    assert sum(len(o.new_token_ids) for o in outs) == 2 and outs[-1].finish_reason == "length"


def test_illegal_transitions_raise():
    r = Request("a", [1], max_tokens=1)
    with pytest.raises(IllegalTransition, match="WAITING -> PREEMPTED"):
        r.transition(RequestStatus.PREEMPTED)
    r.transition(RequestStatus.RUNNING)
    r.transition(RequestStatus.FINISHED_LENGTH)
    with pytest.raises(IllegalTransition):
        r.transition(RequestStatus.RUNNING)


def test_abort_in_any_state_frees_blocks():
    s = make(num_blocks=8, block_size=4, max_model_len=16, max_num_batched_tokens=4)
    s.add_request(Request("run", [1] * 10, max_tokens=5))
    s.add_request(Request("wait", [1] * 3, max_tokens=5))
    fake_step(s)  # "run" is mid-prefill holding a block; "wait" waits
    assert s.kv.num_free_blocks < 8
    s.finish_requests(["run", "wait", "unknown"])
    assert s.kv.num_free_blocks == 8 and not s.requests
    assert set(s.schedule().finished_request_ids) == {"run", "wait"}


def test_tiny_memory_preempts_and_every_request_still_finishes():
    rng = random.Random(0)
    s = make(num_blocks=6, block_size=4, max_model_len=24)
    lengths = {}
    for i in range(8):
        n = rng.randint(1, 12)
        s.add_request(Request(f"r{i}", [1] * n, max_tokens=8))
        lengths[f"r{i}"] = 0
    steps = 0
    while s.has_unfinished_requests():
        _, outs = fake_step(s)
        for o in outs:
            lengths[o.request_id] += len(o.new_token_ids)
        steps += 1
        assert steps < 1000
    assert s.num_preemptions > 0
    assert all(v == 8 for v in lengths.values())
    assert s.kv.num_free_blocks == 6


def test_a_cache_too_small_for_max_model_len_is_refused_with_the_numbers():
    with pytest.raises(
        ValueError, match="max_model_len 100 needs 25 KV blocks of 4 tokens but the cache has only 10"
    ):
        make(num_blocks=10, block_size=4, max_model_len=100)
