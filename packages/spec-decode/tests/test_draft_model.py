"""The draft-model proposer's bookkeeping, against a fake draft whose K/V is a dict of slots: each
forward must write every token it is given at its slot and may read only slots written before
with the request's own tokens; its logits favour ``(token + 1) % V`` after the last token, so the
expected drafts are known without a model."""

import pytest
import torch

from tessera.sampling import SamplingParams, SamplingRow
from tessera.spec_decode import DraftModelProposer, ProposalRequest, make_proposer
from tessera.spec_decode.config import SpeculativeConfig

V = 50
BLOCK = 4


class FakeDraft:
    vocab_size = V

    def __init__(self) -> None:
        self.slots: dict[int, int] = {}  # slot -> token whose K/V is there
        self.calls: list[tuple[list[int], list[int], list[int]]] = []
        self.owners: list[list[str] | None] = []  # per call
        self.forgotten: list[str] = []

    def forget(self, owners):
        self.forgotten.extend(owners)

    def logits(self, token_ids, query_lens, seq_lens, block_tables, owners=None):
        self.calls.append((list(token_ids), list(query_lens), list(seq_lens)))
        self.owners.append(None if owners is None else list(owners))
        out = torch.zeros(len(query_lens), V)
        start = 0
        for i, (q, s, table) in enumerate(zip(query_lens, seq_lens, block_tables, strict=True)):
            toks = token_ids[start : start + q]
            start += q
            for pos, tok in zip(range(s - q, s), toks, strict=True):
                assert pos // BLOCK < len(table), f"position {pos} has no slot"
                self.slots[table[pos // BLOCK] * BLOCK + pos % BLOCK] = tok
            out[i, (toks[-1] + 1) % V] = 5.0
            out[i, (toks[-1] + 2) % V] = 4.0
        return out

    def kv_tokens(self, table, n):
        """The tokens whose K/V sits at the first n positions of a table."""
        return [self.slots.get(table[p // BLOCK] * BLOCK + p % BLOCK) for p in range(n)]


def request(rid, tokens, blocks=8, row=None):
    table = list(range(100 * int(rid[-1]), 100 * int(rid[-1]) + blocks))
    return ProposalRequest(rid, list(tokens), table, blocks * BLOCK, row)


def test_the_first_call_catches_up_on_the_context_then_drafts_one_position_per_forward():
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    r = request("r1", [7, 8, 9])
    out = prop.draft([r], [4])
    assert out.token_ids == [[10, 11, 12, 13]] and out.probs is None
    assert draft.calls == [([7, 8, 9], [3], [3]), ([10], [1], [4]), ([11], [1], [5]), ([12], [1], [6])]
    assert draft.kv_tokens(r.block_table, 6) == [7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize(
    "kept,first_input",
    [
        ([10, 11, 40], [40]),  # two accepted, then the target's own token: only it goes in
        ([10, 11, 12, 13, 14], [13, 14]),  # all four accepted and a bonus: the last draft never went in
        ([30], [30]),  # the first rejected
    ],
)
def test_after_verification_only_what_the_draft_has_not_seen_goes_in(kept, first_input):
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    prop.draft([request("r1", [7, 8, 9])], [4])
    draft.calls.clear()
    ctx = [7, 8, 9, *kept]
    r = request("r1", ctx)
    prop.draft([r], [2])
    ids, qlens, slens = draft.calls[0]
    assert (ids, qlens, slens) == (first_input, [len(first_input)], [len(ctx)])
    # every position the draft has read is what the context holds there
    assert draft.kv_tokens(r.block_table, len(ctx)) == ctx


def test_requests_batch_their_forwards_and_stop_at_their_own_k():
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    a, b, c = request("r1", [1, 2]), request("r2", [5, 6, 7]), request("r3", [9])
    out = prop.draft([a, b, c], [1, 3, 0])
    assert out.token_ids == [[3], [8, 9, 10], []]
    assert [q for _, q, _ in draft.calls] == [[2, 3], [1], [1]]  # one first forward, then r2 alone


def test_the_context_forward_names_each_sequence_s_request_and_release_forgets_them():
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    prop.draft([request("r1", [1, 2]), request("r2", [5, 6, 7])], [2, 1])
    # the first forward reads the requests' context; the later ones only the draft's own tokens
    assert draft.owners == [["r1", "r2"], None]
    prop.release(["r1"])
    assert draft.forgotten == ["r1"]


def test_no_draft_past_the_slots_the_target_reserved():
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    # 2 blocks = 8 slots, 6 tokens: draft token j's K/V goes at 6 + j - 1, so at most 3
    r = ProposalRequest("r1", list(range(6)), [3, 4], 8)
    assert prop.draft([r], [5]).token_ids == [[6, 7, 8]]
    full = ProposalRequest("r2", list(range(9)), [5, 6], 8)  # the sampled token has no slot yet
    assert prop.draft([full], [4]).token_ids == [[]]


def test_a_long_context_catches_up_over_several_calls_without_drafting():
    draft = FakeDraft()
    prop = DraftModelProposer(draft, max_catch_up=4)
    r = request("r1", list(range(10)))
    assert prop.draft([r], [2]).token_ids == [[]]
    assert prop.draft([r], [2]).token_ids == [[]]
    assert prop.draft([r], [2]).token_ids == [[10, 11]]
    assert [q for _, q, _ in draft.calls] == [[4], [4], [2], [1]]
    assert draft.kv_tokens(r.block_table, 11) == [*range(10), 10]


def test_a_draft_ends_at_an_end_of_sequence_token():
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    prop.sampler.eos_token_ids = (12,)
    assert prop.draft([request("r1", [9, 10])], [5]).token_ids == [[11, 12]]


def test_a_released_request_starts_again_from_its_first_token():
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    prop.draft([request("r1", [1, 2, 3])], [2])
    prop.release(["r1"])
    draft.calls.clear()
    prop.draft([request("r1", [1, 2, 3, 4, 5])], [1])
    assert draft.calls[0][0] == [1, 2, 3, 4, 5]


def test_the_request_s_processors_steer_the_draft():
    draft = FakeDraft()
    prop = DraftModelProposer(draft)
    # the draft's favourite after 9 is 10: banned, so the runner-up 11
    row = SamplingRow(SamplingParams(temperature=0.0, logit_bias={10: -100.0}), None, [8, 9], [])
    assert prop.draft([request("r1", [8, 9], row=row)], [1]).token_ids == [[11]]


def test_make_proposer_needs_the_loaded_draft_for_draft_model():
    config = SpeculativeConfig(method="draft_model", model="x", num_speculative_tokens=4)
    with pytest.raises(ValueError, match="needs the loaded draft model"):
        make_proposer(config)
    assert isinstance(make_proposer(config, FakeDraft()), DraftModelProposer)


def test_catch_up_tokens_counts_what_the_draft_has_not_read():
    """A new request: its whole context but the last token. After a draft of 4 of which the
    target kept 2 (and sampled its own third): nothing, the kept drafts' K/V is good. After
    steps without drafting: the tokens accepted meanwhile."""
    prop = DraftModelProposer(FakeDraft())
    r = request("r1", [7, 8, 9, 20, 21])
    assert prop.catch_up_tokens(r) == 4
    prop.draft([r], [4])  # drafts 22 23 24 25
    kept = request("r1", [7, 8, 9, 20, 21, 22, 23, 40])
    assert prop.catch_up_tokens(kept) == 0
    later = request("r1", [7, 8, 9, 20, 21, 22, 23, 40, 41, 42, 43])
    assert prop.catch_up_tokens(later) == 3
    prop.release(["r1"])
    assert prop.catch_up_tokens(later) == 10
