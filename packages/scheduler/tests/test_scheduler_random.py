"""The scheduler over random arrivals, aborts and tiny memory (a fake model samples tokens)."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.kvcache import KVCacheManager, KVCacheSpec, group_layers
from tessera.scheduler import ModelRunnerOutput, Request, Scheduler, SchedulerConfig


def step(s: Scheduler, rng: random.Random):
    so = s.schedule()
    # every scheduled request holds blocks for all the tokens it will have computed
    for rid, n in so.num_scheduled_tokens.items():
        req = s.requests[rid]
        for table in s.kv.block_ids(rid):
            assert len(table) * s.kv.block_size >= req.num_computed_tokens + n
    assert so.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
    assert len(s.running) <= s.config.max_num_seqs
    sampled = {}
    for rid, n in so.num_scheduled_tokens.items():
        req = s.requests[rid]
        if req.num_computed_tokens + n == req.num_tokens:
            sampled[rid] = [rng.randrange(50)]
    return so, s.update_from_output(so, ModelRunnerOutput(sampled))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([2, 4, 16]),
    budget=st.integers(4, 64),
    caching=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    windows=st.sampled_from([[None], [5], [None, 3], [None, 4, 4, 9]]),  # a sliding window per group
)
def test_random_arrivals_and_aborts_all_end_and_free_everything(
    seed, num_blocks, block_size, budget, caching, policy, windows
):
    rng = random.Random(seed)
    kv = KVCacheManager(
        num_blocks,
        block_size,
        enable_caching=caching,
        groups=group_layers([KVCacheSpec(w) for w in windows]),
    )
    max_len = 48  # the longest context one request can hold alone in every group
    while max_len > 2 and sum(kv.blocks_for_context(max_len, budget)) > num_blocks:
        max_len -= 1
    s = Scheduler(
        SchedulerConfig(max_model_len=max_len, max_num_seqs=6, max_num_batched_tokens=budget, policy=policy),
        kv,
    )
    ended: dict[str, str] = {}
    produced: dict[str, int] = {}
    n_req = 0
    for _ in range(400):
        if n_req < 30 and rng.random() < 0.3:
            rid = f"r{n_req}"
            n_req += 1
            prompt = [rng.randrange(3) for _ in range(rng.randint(1, max_len // 2))]
            s.add_request(Request(rid, prompt, max_tokens=rng.randint(1, 8), priority=rng.randint(0, 3)))
            produced[rid] = 0
        if s.requests and rng.random() < 0.05:
            victim = rng.choice(list(s.requests))
            s.finish_requests([victim])
            ended[victim] = "abort"
        _, outs = step(s, rng)
        for o in outs:
            produced[o.request_id] += len(o.new_token_ids)
            if o.finish_reason:
                ended[o.request_id] = o.finish_reason
        if n_req == 30 and not s.has_unfinished_requests():
            break
    extra_steps = 0
    while s.has_unfinished_requests():
        _, outs = step(s, rng)
        for o in outs:
            produced[o.request_id] += len(o.new_token_ids)
            if o.finish_reason:
                ended[o.request_id] = o.finish_reason
        extra_steps += 1
        assert extra_steps < 5000, "requests starved"
    assert set(ended) == set(produced)  # every request finished or was aborted
    assert s.kv.num_free_blocks == num_blocks and s.kv.usage() == 0.0


def test_fcfs_serves_in_arrival_order_under_pressure():
    s = Scheduler(SchedulerConfig(max_model_len=16, max_num_batched_tokens=16), KVCacheManager(4, 4))
    for i in range(5):
        s.add_request(Request(f"r{i}", [i] * 10, max_tokens=4))
    order = []
    rng = random.Random(0)
    while s.has_unfinished_requests():
        _, outs = step(s, rng)
        order += [o.request_id for o in outs if o.finish_reason]
    assert order == [f"r{i}" for i in range(5)]


def test_priority_policy_runs_the_most_urgent_first_and_preempts_the_least():
    s = Scheduler(
        SchedulerConfig(max_model_len=16, max_num_batched_tokens=64, policy="priority"),
        KVCacheManager(5, 4, enable_caching=False),
    )
    s.add_request(Request("low", [1] * 6, max_tokens=8, priority=5))
    s.add_request(Request("high", [2] * 6, max_tokens=8, priority=0))
    so = s.schedule()
    assert list(so.num_scheduled_tokens) == ["high", "low"]
    s.update_from_output(so, ModelRunnerOutput({"high": [7], "low": [7]}))
    rng = random.Random(1)
    preempted = []
    finished = []
    while s.has_unfinished_requests():
        so, outs = step(s, rng)
        preempted += so.preempted_request_ids
        finished += [o.request_id for o in outs if o.finish_reason]
    assert preempted and set(preempted) == {"low"}
    assert finished == ["high", "low"]
