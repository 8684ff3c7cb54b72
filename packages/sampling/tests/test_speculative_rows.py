"""Sampler.probabilities (the distribution a call draws from) and the rows that verify a
speculative draft, including grammar masks computed over the draft and rolled back."""

import json

import pytest
import torch
from scipy import stats

from tessera.sampling import (
    Sampler,
    SamplingParams,
    SamplingRow,
    StructuredOutput,
    draft_bitmasks,
    speculative_rows,
)


def filtered_softmax(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """softmax of x / T over the kept set, from the definitions: the top_k most likely; of those,
    the most likely ones until their mass reaches top_p; of those, the ones with at least min_p
    times the top probability."""
    x = x / p.temperature
    order = x.argsort(descending=True).tolist()
    top = order[: p.top_k] if p.top_k > 0 else order
    probs = torch.softmax(x[top], -1).tolist()
    keep, mass = [], 0.0
    for tok, q in zip(top, probs, strict=True):
        if keep and mass >= p.top_p:
            break
        if q >= p.min_p * probs[0]:
            keep.append(tok)
        mass += q
    out = torch.full_like(x, float("-inf"))
    out[keep] = x[keep]
    return torch.softmax(out, -1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=1.0, top_k=8, top_p=0.8, min_p=0.05),
    ],
)
def test_probabilities_are_the_filtered_tempered_softmax(params):
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    probs = Sampler().probabilities(logits, [SamplingRow(params)] * 3)
    for row in range(3):
        torch.testing.assert_close(probs[row], filtered_softmax(logits[row], params))


def test_probabilities_of_a_greedy_row_are_one_hot_at_the_argmax_after_processing():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    row = SamplingRow(SamplingParams(temperature=0, logit_bias={3: 5.0}))
    assert Sampler().probabilities(logits, [row]).tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_the_sampler_draws_from_its_probabilities():
    """Chi-square of 40k draws of a processed row (penalties, bias, top-p) against probabilities()."""
    torch.manual_seed(5)
    logits = torch.randn(12) * 1.5
    params = SamplingParams(
        temperature=0.8, top_p=0.9, presence_penalty=0.7, repetition_penalty=1.3, logit_bias={4: 1.0}
    )
    row = SamplingRow(params, None, [1, 2, 3], [3, 3, 7])
    expected = Sampler().probabilities(logits[None], [row])[0].double()
    n = 40000
    draws = torch.tensor(Sampler()(logits.expand(n, -1).contiguous(), [row] * n).token_ids)
    counts = torch.bincount(draws, minlength=12).double()
    support = expected > 0
    assert counts[~support].sum() == 0
    assert stats.chisquare(counts[support].numpy(), (expected[support] * n).numpy()).pvalue > 1e-4


def test_verification_row_j_is_the_request_after_the_first_j_draft_tokens():
    params = SamplingParams(temperature=1.0, frequency_penalty=0.5, min_tokens=3, seed=3)
    row = SamplingRow(params, None, [9, 9], [4])
    rows = speculative_rows(row, [5, 6, 7])
    assert [r.output_token_ids for r in rows] == [[4], [4, 5], [4, 5, 6], [4, 5, 6, 7]]
    assert row.output_token_ids == [4]
    sampler = Sampler(eos_token_ids=(0,))
    logits = torch.randn(4, 10)
    probs = sampler.probabilities(logits, rows)
    # min_tokens=3: EOS banned while fewer than 3 tokens are out, i.e. at rows 0 and 1
    assert (probs[:2, 0] == 0).all() and (probs[2:, 0] > 0).all()
    for j in range(4):  # each row as the plain request with those outputs
        plain = SamplingRow(params, None, [9, 9], [4, 5, 6, 7][: j + 1])
        torch.testing.assert_close(probs[j], sampler.probabilities(logits[j : j + 1], [plain])[0])


# --- grammar masks over a draft -------------------------------------------------------------


@pytest.fixture(scope="module")
def json_tokenizer():
    """A byte-level BPE tokenizer with a few JSON merges, so tokens span several characters."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<eos>": 0}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for a, b in [('{', '"'), ('"', ':'), ("t", "r"), ("tr", "u"), ("tru", "e"), ("f", "a"), ("fa", "l"),
                 ("fal", "s"), ("fals", "e"), ("o", "k"), ('"', "}"), (",", '"')]:  # fmt: skip
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    return tok


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


_llguidance_tokenizers: dict = {}


def matcher_for(tok):
    from llguidance import LLMatcher, LLTokenizer

    if id(tok) not in _llguidance_tokenizers:
        _llguidance_tokenizers[id(tok)] = LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=0)
    grammar = StructuredOutput(json_schema=json.dumps(SCHEMA)).grammar_spec()
    return LLMatcher(_llguidance_tokenizers[id(tok)], grammar)


def mask_after(tok, tokens: list[int]) -> torch.Tensor:
    """llguidance's own mask after ``tokens``, from a fresh matcher (the reference)."""
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    m = matcher_for(tok)
    assert m.consume_tokens(tokens)
    mask = allocate_token_bitmask(1, tok.get_vocab_size())
    fill_next_token_bitmask(m, mask, 0)
    return mask[0]


def test_draft_masks_are_the_matchers_masks_after_each_prefix_and_the_matcher_is_rolled_back(json_tokenizer):
    tok = json_tokenizer
    vocab = tok.get_vocab_size()
    ids = tok.encode('{"ok":true,"n":42}').ids
    out, draft = ids[:2], ids[2:7]
    m = matcher_for(tok)
    assert m.consume_tokens(out)
    before = mask_after(tok, out)
    masks = draft_bitmasks(m, draft, vocab)
    assert masks.shape == (len(draft) + 1, (vocab + 31) // 32)
    for j in range(len(draft) + 1):
        assert torch.equal(masks[j], mask_after(tok, out + draft[:j])), f"position {j}"
    # the matcher is where it was: the same mask, and it takes the real continuation
    again = draft_bitmasks(m, [], vocab)[0]
    assert torch.equal(again, before)
    assert m.consume_tokens(ids[2:]) and m.is_accepting()


def test_after_a_token_the_grammar_forbids_the_masks_repeat_and_the_target_gives_it_zero(json_tokenizer):
    tok = json_tokenizer
    vocab = tok.get_vocab_size()
    ids = tok.encode('{"ok":true,"n":42}').ids
    bad = tok.token_to_id("x")
    draft = [ids[0], ids[1], bad, ids[3]]  # {" ok x ... : "x" is no key of the schema
    m = matcher_for(tok)
    rows = speculative_rows(
        SamplingRow(SamplingParams(temperature=1.0), matcher=m, matcher_vocab=vocab), draft
    )
    assert all(r.matcher is None and r.token_bitmask is not None for r in rows)
    assert torch.equal(rows[3].token_bitmask, rows[2].token_bitmask)
    assert torch.equal(rows[4].token_bitmask, rows[2].token_bitmask)
    probs = Sampler(eos_token_ids=(0,)).probabilities(torch.randn(len(rows), vocab), rows)
    assert probs[2, bad] == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(rows)))
    assert m.consume_tokens(ids)  # untouched by the verification


def test_a_draft_that_completes_the_json_and_ends_rolls_back_fully(json_tokenizer):
    tok = json_tokenizer
    ids = tok.encode('{"ok":false,"n":7}').ids
    m = matcher_for(tok)
    assert m.consume_tokens(ids[:3])
    masks = draft_bitmasks(m, ids[3:] + [0, 0], tok.get_vocab_size())
    eos_only = masks[len(ids) - 3]  # after the closing brace only EOS may follow
    allowed = [t for t in range(tok.get_vocab_size()) if (int(eos_only[t >> 5]) >> (t & 31)) & 1]
    assert allowed == [0]
    assert torch.equal(masks[-1], eos_only)
    assert torch.equal(draft_bitmasks(m, [], tok.get_vocab_size())[0], mask_after(tok, ids[:3]))
