"""The step loop's bookkeeping with a fake model: arrivals, aborts, tiny memory."""

import random

import msgspec
import pytest

from tessera.kvcache import KVCacheManager, KVCacheSpec, cdiv, group_layers
from tessera.scheduler import (
    EngineCoreOutput,
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
    # the payload is whatever msgpack the engine made; the scheduler never looks inside
    payload = msgspec.msgpack.encode({"temperature": 0.5, "logit_bias": {3: -1.5}})
    s.add_request(Request("a", [1, 2, 3], max_tokens=2, sampling_params=payload))
    s.add_request(Request("b", [4, 5], max_tokens=2))
    so, _ = fake_step(s)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(so), type=SchedulerOutput)
    assert back == so
    assert bytes(back.new_requests[0].sampling_params) == payload
    assert msgspec.msgpack.decode(back.new_requests[1].sampling_params) is None  # no parameters
    so = s.schedule()  # cached requests now: their counts and per-group blocks
    assert so.cached_requests
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(so), type=SchedulerOutput) == so


def test_model_runner_output_with_logprobs_crosses_as_bytes_and_comes_back_equal():
    ro = ModelRunnerOutput(
        {"a": [5], "b": [7]},
        logprobs={"a": [[(5, -0.25), (9, -1.5), (2, -3.0)]]},
        prompt_logprobs={"b": [[(4, -2.0)], [(1, -0.5), (1, -0.5)]]},
    )
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(ro), type=ModelRunnerOutput)
    assert back == ro and isinstance(back.logprobs["a"][0][0], tuple)
    out = EngineCoreOutput("a", [5], "stop", 5, 3, ro.logprobs["a"], ro.prompt_logprobs["b"])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=EngineCoreOutput) == out


def test_sampling_params_must_arrive_encoded():
    with pytest.raises(TypeError, match="sampling_params must be msgpack bytes"):
        Request("a", [1], max_tokens=1, sampling_params={"temperature": 0})


def test_cached_requests_carry_the_schedulers_token_counts_at_the_start_of_the_step():
    s = make(max_num_batched_tokens=4)
    s.add_request(Request("a", list(range(6)), max_tokens=3))
    counts = []
    while s.has_unfinished_requests():
        so, _ = fake_step(s)
        counts += [(c.num_computed_tokens, c.num_tokens) for c in so.cached_requests]
    # prefill 4 (new), prefill 2 of 6, then decode the 7th and 8th token
    assert counts == [(4, 6), (6, 7), (7, 8)]


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


def test_a_hybrid_cache_sends_a_table_per_group_and_sliding_groups_keep_only_their_window():
    groups = group_layers([KVCacheSpec(), KVCacheSpec(8), KVCacheSpec(8)])
    s = Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(64, 4, groups=groups))
    s.add_request(Request("a", list(range(20)), max_tokens=30))
    so, _ = fake_step(s)
    (new,) = so.new_requests
    assert len(new.block_ids) == 3 and all(len(t) == 5 for t in new.block_ids)
    tables = [list(t) for t in new.block_ids]
    while s.has_unfinished_requests():
        so, _ = fake_step(s)
        if not so.cached_requests:
            continue
        (cr,) = so.cached_requests
        assert len(cr.new_block_ids) == 3
        for t, added in zip(tables, cr.new_block_ids, strict=True):
            t.extend(added)
        if s.requests:
            held = s.kv.num_held_blocks("a")
            assert held[0] == len(tables[0]) and max(held[1:]) <= cdiv(8, 4) + 1
    assert s.kv.num_free_blocks == 64
    # the runner's tables, built from deltas alone, cover all 50 tokens in every group
    assert all(len(t) == cdiv(49, 4) for t in tables)


def test_a_hybrid_cache_too_small_for_max_model_len_is_refused_with_each_groups_share():
    groups = group_layers([KVCacheSpec(), KVCacheSpec(8)])
    with pytest.raises(ValueError, match=r"needs 32 KV blocks of 4 tokens \(25 \+ 7 in its groups\) but"):
        Scheduler(
            SchedulerConfig(max_model_len=100, max_num_batched_tokens=16),
            KVCacheManager(30, 4, groups=groups),
        )
