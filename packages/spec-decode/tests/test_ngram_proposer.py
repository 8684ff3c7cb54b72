"""The compiled n-gram proposer against a brute-force reference written from the rule."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.spec_decode import NgramProposer


def reference_propose(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The rule, by brute force: the longest n in [min_n, max_n] whose last-n-token suffix occurs
    earlier in the context (an occurrence other than the suffix itself); of that n-gram the
    earliest occurrence; the up to k tokens after it."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for start in range(0, length - n):  # start + n <= length - 1: a token follows it
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_the_examples_of_vllms_docstring():
    # vLLM's NgramProposer.propose: [1,2,3,4,2,3], min 2, max 3, k 4 -> [4, 2, 3]
    assert NgramProposer(2, 3, 4).propose([1, 2, 3, 4, 2, 3]) == [4, 2, 3]
    assert NgramProposer(2, 2, 2).propose([1, 2, 3, 4, 1, 2, 3, 5, 6]) == []


def test_the_longest_match_wins_then_the_earliest_occurrence():
    # last 3 = [7, 8, 9] occurs once (at 4); last 2 = [8, 9] also at 0 and 8
    tokens = [8, 9, 1, 2, 7, 8, 9, 3, 8, 9, 5, 7, 8, 9]
    assert NgramProposer(1, 3, 2).propose(tokens) == [3, 8]
    assert NgramProposer(1, 2, 2).propose(tokens) == [1, 2]  # earliest of [8, 9]
    # in a run of period 2 the earliest occurrence leaves k tokens to copy
    assert NgramProposer(2, 2, 4).propose([4, 5, 4, 5, 4, 5, 4, 5]) == [4, 5, 4, 5]


def test_no_proposal_below_the_minimum_or_without_context():
    p = NgramProposer(2, 4, 3)
    assert p.propose([]) == []
    assert p.propose([1]) == []
    assert p.propose([1, 1]) == []  # a 1-gram match only
    assert p.propose([1, 1, 1]) == [1]
    assert p.propose([1, 2, 1, 2], k=0) == []


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=60),
    alphabet=st.integers(1, 4),
    min_n=st.integers(1, 4),
    extra=st.integers(0, 4),
    k=st.integers(0, 6),
)
def test_compiled_proposals_equal_the_reference(tokens, alphabet, min_n, extra, k):
    tokens = [t % alphabet for t in tokens]
    max_n = min_n + extra
    got = NgramProposer(min_n, max_n, max(k, 1)).propose(tokens, k=k)
    assert got == reference_propose(tokens, min_n, max_n, k)


@settings(max_examples=60, deadline=None)
@given(
    contexts=st.lists(st.lists(st.integers(0, 2), max_size=40), min_size=1, max_size=12),
    ks=st.data(),
)
def test_a_batch_equals_one_call_per_request(contexts, ks):
    per_request_k = ks.draw(st.lists(st.integers(0, 5), min_size=len(contexts), max_size=len(contexts)))
    proposer = NgramProposer(1, 3, 4)
    # the runner's layout: one row per request, wider than any context, garbage past its length
    width = max(len(c) for c in contexts) + 5
    buf = np.full((len(contexts), width), 7, dtype=np.int32)
    for row, c in zip(buf, contexts, strict=True):
        row[: len(c)] = c
    lens = [len(c) for c in contexts]
    expected = [reference_propose(c, 1, 3, k) for c, k in zip(contexts, per_request_k, strict=True)]
    assert proposer.propose_batch(buf, lens, per_request_k) == expected
    assert proposer.propose_batch(contexts, k=per_request_k) == expected
    assert proposer.propose_batch(contexts) == [reference_propose(c, 1, 3, 4) for c in contexts]


def test_a_strided_int64_batch_is_read_correctly():
    proposer = NgramProposer(1, 2, 3)
    buf = np.zeros((6, 10), dtype=np.int64)
    buf[:, :6] = [1, 2, 3, 1, 2, 0]
    view = buf[::2, :]  # every other row: a non-unit row stride
    assert proposer.propose_batch(view, [5, 5, 5]) == [[3, 1, 2]] * 3


def test_a_long_context_takes_one_linear_pass():
    """A context that makes naive matching quadratic in max_n: all ones but the last token."""
    rng = np.random.default_rng(0)
    tokens = np.ones(2_000_000, dtype=np.int32)
    tokens[-1] = 2
    assert NgramProposer(1, 1000, 4).propose(tokens) == []
    tokens = rng.integers(0, 50_000, 1_000_000).astype(np.int32)
    tokens[-3:] = tokens[10:13]
    assert NgramProposer(2, 3, 4).propose(tokens) == tokens[13:17].tolist()


@pytest.mark.parametrize(
    "args,field",
    [
        ((0, 2, 3), "prompt_lookup_min"),
        ((3, 2, 3), "prompt_lookup_max"),
        ((1, 2, 0), "num_speculative_tokens"),
    ],
)
def test_bad_settings_are_refused_by_name(args, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        NgramProposer(*args)


def test_bad_inputs_are_refused_by_name():
    p = NgramProposer(1, 2, 3)
    with pytest.raises(ValueError, match="outside int32"):
        p.propose(np.array([1, 2**40]))
    with pytest.raises(ValueError, match="integer token ids"):
        p.propose(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="num_tokens must be within"):
        p.propose_batch(np.zeros((2, 4), dtype=np.int32), [1, 5])
    with pytest.raises(ValueError, match="one integer >= 0 per request"):
        p.propose_batch([[1, 2], [3]], k=[1])
