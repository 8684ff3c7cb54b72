"""The scheduler's side of speculative decoding with a fake runner: drafts travel in
SchedulerOutput with lookahead slots, rejected tokens roll num_computed_tokens back, no draft
while prefilling, a preempted request drops its draft, only accepted tokens are hashed, and
every block comes back."""

from tessera.kvcache import KVCacheManager
from tessera.scheduler import ModelRunnerOutput, Request, Scheduler, SchedulerConfig


def make(num_blocks=64, block_size=4, max_model_len=64, **kw):
    return Scheduler(
        SchedulerConfig(max_model_len=max_model_len, **kw), KVCacheManager(num_blocks, block_size)
    )


def step(s: Scheduler, accept: int = 0, draft=(5, 6, 7), bonus=9):
    """One step: a request with a draft keeps its first ``accept`` draft tokens and samples
    ``bonus``; every request that yields tokens proposes ``draft`` next."""
    so = s.schedule()
    sampled, drafts = {}, {}
    for rid, n in so.num_scheduled_tokens.items():
        req = s.requests[rid]
        d = so.scheduled_spec_tokens.get(rid, [])
        if req.num_computed_tokens + n - len(d) == req.num_tokens:
            sampled[rid] = list(d[:accept]) + [bonus]
            drafts[rid] = list(draft)
    return so, s.update_from_output(so, ModelRunnerOutput(sampled, spec_token_ids=drafts))


def test_a_draft_is_scheduled_after_the_last_token_with_lookahead_slots():
    s = make()
    s.add_request(Request("a", [1, 2, 3, 4, 5], max_tokens=20))
    so, _ = step(s)  # prefill: samples 9, proposes 5 6 7
    assert so.scheduled_spec_tokens == {}
    so, outs = step(s, accept=2)
    assert so.scheduled_spec_tokens == {"a": [5, 6, 7]}
    assert so.num_scheduled_tokens == {"a": 4}  # the last token and three drafts
    # slots for 6 + 3 = 9 tokens: three blocks of 4
    assert len(s.kv.block_ids("a")[0]) == 3
    assert outs[0].new_token_ids == [5, 6, 9]
    req = s.requests["a"]
    # tokens 1..5, 9, 5, 6, 9: all but the last computed; the rejected draft token rolled back
    assert req.num_tokens == 9 and req.num_computed_tokens == 8
    st = s.stats()
    assert (st.spec_num_drafts, st.spec_num_draft_tokens, st.spec_num_accepted_tokens) == (1, 3, 2)
    assert st.spec_mean_accepted_length == 3.0 and st.num_spec_steps == 1 and st.num_steps == 2


def test_all_rejected_rolls_back_to_one_token_past_the_last_computed():
    s = make()
    s.add_request(Request("a", [1, 2, 3], max_tokens=20))
    step(s)
    step(s, accept=0)
    req = s.requests["a"]
    assert req.output_token_ids == [9, 9] and req.num_computed_tokens == req.num_tokens - 1


def test_no_draft_while_a_prompt_is_still_prefilling():
    s = make(max_num_batched_tokens=4)
    s.add_request(Request("a", list(range(1, 11)), max_tokens=20))
    s.requests["a"].spec_token_ids = [5, 6]  # as if proposed: must wait for the prompt
    for _ in range(2):
        so, _ = step(s)
        assert so.scheduled_spec_tokens == {}
    so, _ = step(s)  # the last chunk samples and proposes
    so, _ = step(s)
    assert so.scheduled_spec_tokens == {"a": [5, 6, 7]}


def test_the_draft_is_cut_to_the_budget_and_the_remaining_output():
    s = make(max_num_batched_tokens=3)
    s.add_request(Request("a", [1, 2], max_tokens=20))
    step(s)
    so, _ = step(s)
    assert so.scheduled_spec_tokens == {"a": [5, 6]}  # budget 3: the last token and two drafts
    s = make()
    s.add_request(Request("b", [1, 2], max_tokens=3))
    step(s)
    so, outs = step(s, accept=3)
    # two tokens still to come: one draft token and the one sampled after it
    assert so.scheduled_spec_tokens == {"b": [5]}
    assert outs[0].finish_reason == "length" and s.kv.num_free_blocks == 64


def test_a_preempted_request_drops_its_draft_and_frees_everything():
    s = make(num_blocks=6, block_size=4, max_model_len=24)
    s.add_request(Request("a", list(range(1, 9)), max_tokens=12))
    s.add_request(Request("b", list(range(11, 19)), max_tokens=12))
    preempted_with_draft = []
    while s.has_unfinished_requests():
        before = {rid: bool(r.spec_token_ids) for rid, r in s.requests.items()}
        so, _ = step(s, accept=1)
        preempted_with_draft += [before[r] for r in so.preempted_request_ids]
        for rid in so.preempted_request_ids:
            assert s.requests[rid].spec_token_ids == []
    assert s.num_preemptions > 0 and any(preempted_with_draft)
    assert s.kv.num_free_blocks == 6


def test_only_blocks_of_accepted_tokens_are_hashed():
    s = make(block_size=4)
    s.add_request(Request("a", [1, 2, 3], max_tokens=20))
    step(s)  # tokens 1 2 3 | 9
    step(s, accept=0)  # computes 9 5 6 7 at positions 3..6: the block 1 2 3 9 is known
    assert s.kv._num_cached["a"] == 1
    step(s, accept=3)  # computes 9 5 6 7 at positions 4..7, filling block 1 with draft tokens
    assert s.kv._num_cached["a"] == 1  # not hashed while they are drafts
    assert s.requests["a"].all_token_ids == [1, 2, 3, 9, 9, 5, 6, 7, 9]
    step(s, accept=0)
    assert s.kv._num_cached["a"] == 2  # 9 5 6 7: accepted, hashed now


def test_lookahead_slots_cover_a_draft_model_s_positions_up_to_the_context():
    # a draft model writes K/V at the k positions after the sampled token: k slots past the step's
    s = make(num_lookahead_tokens=3, max_model_len=14)
    s.add_request(Request("a", [1, 2, 3, 4, 5], max_tokens=20))
    step(s)  # the prompt, all in one step: 5 tokens and 3 lookahead = 2 blocks
    assert len(s.kv.block_ids("a")[0]) == 2
    step(s, accept=3)  # 6 tokens + 3 drafts + 3 lookahead = 12 slots
    assert len(s.kv.block_ids("a")[0]) == 3
    step(s, accept=0)  # 10 tokens: 10 + 3 + 3 capped at the context of 14 = 4 blocks
    assert len(s.kv.block_ids("a")[0]) == 4
    assert s.requests["a"].num_tokens == 11


def test_lookahead_never_costs_a_preemption():
    # 4 blocks of 4: two 3-token prompts with their lookahead take 2 blocks each; the next step's
    # drafts and lookahead would need a third each, so both run their last token alone instead
    s = make(num_blocks=4, num_lookahead_tokens=4, max_model_len=16)
    s.add_request(Request("a", [1, 2, 3], max_tokens=10))
    s.add_request(Request("b", [11, 12, 13], max_tokens=10))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"a": 3, "b": 3}
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"a": 1, "b": 1} and so.scheduled_spec_tokens == {}
    assert s.stats().num_preemptions == 0
