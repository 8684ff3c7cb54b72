"""--speculative-config is checked field by field with errors that name the field; the adaptive
policy speculates where it pays (a small batch, good acceptance), not where it does not (a large
batch, poor acceptance), probes now and then, and is deterministic."""

import json
import random

import pytest

from tessera.spec_decode import Acceptance, AdaptivePolicy, SpeculativeConfig, StepTimes, expected_tokens


def test_a_valid_config_parses_from_json_and_from_a_dict():
    text = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
    c = SpeculativeConfig.parse(text)
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.adaptive) == ("ngram", 4, 2, True)
    assert (
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).num_speculative_tokens == 2
    )
    assert SpeculativeConfig.parse(None) is None


@pytest.mark.parametrize(
    "value,names",
    [
        ("{nope", "not valid JSON"),
        ('{"method": "eagle", "num_speculative_tokens": 4}', "speculative_config.method"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 17}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": "4"}', "num_speculative_tokens"),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5}', "prompt_lookup_max"),
        ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 0}', "prompt_lookup_min"),
        ('{"method": "ngram", "num_speculative_tokens": 4, "lookup": 3}', "lookup"),
        ('{"method": "draft_model", "num_speculative_tokens": 4}', "speculative_config.model is required"),
        ('{"method": "ngram", "model": "x", "num_speculative_tokens": 4}', "speculative_config.model"),
        ('{"method": "ngram", "num_speculative_tokens": 4, "quantization": "q4_0"}', "quantization is for"),
        ('{"method": "ngram", "num_speculative_tokens": 4, "draft_vocab_size": 4096}', "draft_vocab_size is"),
        (
            '{"method": "draft_model", "model": "x", "num_speculative_tokens": 4, "quantization": "q2_k"}',
            "speculative_config.quantization must be one of 'q4_0', 'q4_1', 'q8_0'",
        ),
        (
            '{"method": "draft_model", "model": "x", "num_speculative_tokens": 4, "draft_vocab_size": 100}',
            "draft_vocab_size must be at least 256",
        ),
        (
            '{"method": "draft_model", "model": "x", "num_speculative_tokens": 4, "draft_vocab_size": 4096, '
            '"draft_vocab_corpus": "/nonexistent/corpus.txt"}',
            "draft_vocab_corpus '/nonexistent/corpus.txt' does not exist",
        ),
        (
            '{"method": "draft_model", "model": "x", "num_speculative_tokens": 4, "draft_vocab_corpus": "/"}',
            "draft_vocab_corpus needs draft_vocab_size",
        ),
        ("[4]", "JSON object"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(value, names):
    with pytest.raises(ValueError, match=names):
        SpeculativeConfig.parse(value)


def test_a_corpus_without_text_is_refused_before_any_weight_loads(tmp_path):
    def spec(corpus) -> str:
        return json.dumps(
            {"method": "draft_model", "model": "x", "num_speculative_tokens": 4, "draft_vocab_size": 4096,
             "draft_vocab_corpus": str(corpus)}
        )  # fmt: skip

    (tmp_path / "empty.txt").touch()
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "empty.md").touch()
    for corpus in (tmp_path / "empty.txt", tmp_path / "folder"):
        with pytest.raises(ValueError, match="draft_vocab_corpus .* holds no text"):
            SpeculativeConfig.parse(spec(corpus))
    (tmp_path / "folder" / "sub" / "text.md").write_text("def f(): pass\n")
    assert SpeculativeConfig.parse(spec(tmp_path / "folder")).draft_vocab_corpus == str(tmp_path / "folder")


def test_expected_tokens_counts_the_accepted_run_and_the_token_after_it():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_good_acceptance_in_a_small_batch_speculates_fully():
    policy = AdaptivePolicy(4)
    acc = Acceptance()
    policy.record(acc, 4, 4)
    policy.record(acc, 4, 4)
    assert policy.choose_k(acc, batch_size=1) == 4
    assert policy.choose_k(acc, batch_size=1, limit=2) == 2  # what the request can still use


def test_a_large_batch_turns_speculation_off_even_at_good_acceptance():
    policy = AdaptivePolicy(4)
    acc = Acceptance()
    for _ in range(3):
        policy.record(acc, 4, 3)
    assert policy.choose_k(acc, batch_size=1) > 0
    assert policy.choose_k(acc, batch_size=256) == 0
    assert AdaptivePolicy(4, disable_by_batch_size=8).choose_k(acc, batch_size=9) == 0


def test_poor_acceptance_stops_speculation_but_probes_every_few_steps():
    policy = AdaptivePolicy(4, probe_interval=4)
    acc = Acceptance()
    for _ in range(5):
        policy.record(acc, 4, 0)
    ks = [policy.choose_k(acc, batch_size=1) for _ in range(8)]
    assert ks == [0, 0, 0, 1, 0, 0, 0, 1]


def test_without_adaptive_every_request_drafts_the_configured_k():
    policy = AdaptivePolicy(3, adaptive=False)
    acc = Acceptance()
    policy.record(acc, 3, 0)
    assert policy.choose_k(acc, batch_size=200) == 3


def test_step_times_fit_the_line_of_seconds_against_tokens():
    st = StepTimes(min_steps=4)
    for tokens in [1, 5, 1, 5]:
        assert st.line() is None
        st.observe(tokens, 0.080 + 0.008 * tokens)
    w, t = st.line()
    assert w == pytest.approx(0.080) and t == pytest.approx(0.008)
    same = StepTimes(min_steps=2)
    for _ in range(5):
        same.observe(3, 0.1)
    assert same.line() is None and same.mean_seconds() == pytest.approx(0.1)


def test_step_times_curve_interpolates_buckets_and_never_falls():
    st = StepTimes()
    assert st.seconds(4) == 0.0  # nothing timed yet
    # a CPU-like curve: flat to 4 tokens, then 2 ms a token; one noisy step below its neighbour
    truth = {1: 0.015, 2: 0.0152, 4: 0.0155, 8: 0.023, 16: 0.039, 32: 0.071, 64: 0.135}
    for t, y in truth.items():
        st.observe(t, y)
    st.observe(24, 0.030)  # noise: less than at 16 tokens
    for t in (1, 2, 4, 8, 16, 32, 64):
        assert st.seconds(t) >= truth[t] - 1e-12
    assert st.seconds(12) == pytest.approx((0.023 + 0.039) / 2)
    assert st.seconds(24) >= st.seconds(16)  # made non-decreasing
    assert st.seconds(128) == pytest.approx(0.135 + 64 * (0.135 - 0.071) / 32)  # the last slope
    assert st.seconds(0) == pytest.approx(0.015)


def test_the_measured_curve_drafts_where_tokens_are_nearly_free_and_not_where_they_cost():
    """With the curve above and 85% acceptance, 2 requests draft several tokens (8 tokens cost
    what 2 nearly do) and 8 requests none (8 x 3 tokens take 2.4 times 8's, for 2.6 times the
    tokens at best); the least-squares line through the same points (W = 9.5 ms, t = 1.9 ms:
    too little for one token, too much slope for few) has 8 requests draft 2 each."""
    truth = {1: 0.015, 2: 0.0152, 4: 0.0155, 8: 0.023, 16: 0.039, 32: 0.071, 64: 0.135}
    st = StepTimes(min_steps=2)
    for t, y in truth.items():
        st.observe(t, y)
    curve = AdaptivePolicy(4, step_seconds=st.seconds)
    assert curve.choose_k(Acceptance(drafted=100.0, accepted=85.0), 2) >= 2
    assert curve.choose_k(Acceptance(drafted=100.0, accepted=85.0), 8) == 0
    w, t = st.line()
    line = AdaptivePolicy(4, token_cost=t / w)
    assert line.choose_k(Acceptance(drafted=100.0, accepted=85.0), 8) == 2


def test_a_catch_up_drafts_only_where_the_rest_of_the_request_repays_it():
    """A draft model that must first read what the target accepted meanwhile (here 8 plain
    steps' worth): worth it with 400 tokens still to write (the next 64 of them, about 17 steps
    at 85% acceptance, share it), not with 6 (two steps would carry it all)."""
    acc = Acceptance(drafted=100.0, accepted=85.0)
    policy = AdaptivePolicy(4, token_cost=0.05)
    assert policy.choose_k(acc, 2, limit=400, catch_up=8.0) == 4
    assert policy.choose_k(acc, 2, limit=6, catch_up=8.0) == 0
    assert policy.choose_k(acc, 2, limit=6) == 4  # without the catch-up it would


def test_a_costly_draft_drafts_less_or_not_at_all():
    acc = Acceptance(drafted=10.0, accepted=7.0)
    cheap, costly = AdaptivePolicy(8, draft_cost=0.05), AdaptivePolicy(8, draft_cost=0.6)
    assert cheap.choose_k(acc, 1) > 2
    assert costly.choose_k(acc, 1) == 0


def test_the_acceptance_estimate_is_the_chance_of_a_reached_draft_token():
    # drafts of 4 each accepted with chance 0.9 until the first rejection: 0.77 of drafted tokens
    # are accepted, but the policy's estimate must be the per-position 0.9
    rng = random.Random(0)
    policy, acc = AdaptivePolicy(4, decay=0.999), Acceptance()
    for _ in range(4000):
        n = 0
        while n < 4 and rng.random() < 0.9:
            n += 1
        policy.record(acc, 4, n)
    assert acc.rate == pytest.approx(0.9, abs=0.015)


def test_drafts_that_continue_a_whole_accept_are_estimated_apart_and_drafted_longer():
    # copying a stretch: after a draft accepted whole the next is accepted with chance 0.97 a
    # token; after a rejection with 0.5. One estimate would sit between and draft the same k
    # everywhere; apart, a run drafts long and a fresh start short.
    rng = random.Random(1)
    policy, acc = AdaptivePolicy(8, decay=0.99), Acceptance()
    for _ in range(3000):
        p = 0.97 if acc.in_run else 0.5
        n = 0
        while n < 8 and rng.random() < p:
            n += 1
        policy.record(acc, 8, n)
    acc.in_run = True
    assert acc.rate == pytest.approx(0.97, abs=0.02)
    long_k = policy.choose_k(acc, 1)
    acc.break_run()
    assert acc.rate == pytest.approx(0.5, abs=0.05)
    assert policy.choose_k(acc, 1) < long_k == 8
