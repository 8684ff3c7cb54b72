"""SamplingParams validation and the batched sampler (exact tests of the distributions)."""

import pytest
import torch
from scipy import stats

from tessera.sampling import Sampler, SamplingParams, SamplingRow, filter_logits, make_generator


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_values_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50)
    out = Sampler()(logits, [SamplingRow(SamplingParams(temperature=0))] * 3)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_a_seeded_row_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    p = SamplingParams(temperature=1.0, seed=1234)

    def draw(batch_rows):
        rows = [SamplingRow(p, make_generator(1234, torch.device("cpu")))]
        rows += [SamplingRow(SamplingParams(temperature=0.7))] * (len(batch_rows) - 1)
        return Sampler()(logits[batch_rows], rows).token_ids[:1]

    alone = Sampler()(logits[:1], [SamplingRow(p, make_generator(1234, torch.device("cpu")))]).token_ids
    assert draw([0, 1, 2, 3]) == alone == draw([0, 3])


def test_a_seeded_rows_draw_depends_on_its_seed_and_output_position_alone():
    """A request rebuilt after preemption has a fresh generator: its draw for output token k is
    still the one a request never preempted makes at k."""
    torch.manual_seed(1)
    logits = torch.randn(1, 5000)
    p = SamplingParams(temperature=1.0, seed=99)
    cpu = torch.device("cpu")
    g = make_generator(99, cpu)
    run, outputs = [], []
    for _ in range(6):  # one generator across steps, as a request that runs through
        (tok,) = Sampler()(logits, [SamplingRow(p, g, [1, 2], list(outputs))]).token_ids
        run.append(tok)
        outputs.append(tok)
    fresh = [
        Sampler()(logits, [SamplingRow(p, make_generator(99, cpu), [1, 2], run[:k])]).token_ids[0]
        for k in range(6)
    ]
    assert fresh == run
    assert len(set(run)) > 1  # the draws do move from step to step
    other = SamplingParams(temperature=1.0, seed=100)
    assert [
        Sampler()(logits, [SamplingRow(other, make_generator(100, cpu), [1, 2], run[:k])]).token_ids[0]
        for k in range(6)
    ] != run


def kept_set(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The tokens a filter keeps, written from the definitions: the k most likely; of those, the
    most likely ones until their mass reaches top_p; and only tokens with at least min_p times
    the top probability."""
    order = x.argsort(descending=True).tolist()
    k = p.top_k if p.top_k > 0 else len(order)
    top = order[:k]
    probs = torch.softmax(x[top], -1).tolist()
    keep, mass = [], 0.0
    for tok, q in zip(top, probs, strict=True):
        if keep and mass >= p.top_p:
            break
        if q >= p.min_p * probs[0]:
            keep.append(tok)
        mass += q
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[keep] = True
    return mask


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=8, top_p=0.8, min_p=0.05),
    ],
)
def test_samples_follow_the_filtered_softmax(params):
    """Chi-square of 50k independent draws (one batch, one row each) against the softmax of
    the tempered logits restricted to the kept set."""
    torch.manual_seed(3)
    logits = torch.randn(12) * 2
    n = 50000
    samples = torch.tensor(Sampler()(logits.expand(n, -1).contiguous(), [SamplingRow(params)] * n).token_ids)
    x = logits / params.temperature
    keep = kept_set(x, params)
    assert keep[samples].all(), "sampled a token outside the kept set"
    target = torch.where(keep, x, torch.tensor(float("-inf"))).softmax(-1).double()
    counts = torch.bincount(samples, minlength=12).double()
    expected = target / target.sum() * n
    pvalue = stats.chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue
    assert pvalue > 1e-4  # a real bias gives p ~ 0 at this sample size


def test_filter_logits_keeps_the_top_token_even_when_top_p_is_tiny():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    out = filter_logits(logits, torch.tensor([0]), torch.tensor([1e-6]), torch.tensor([0.0]))
    assert torch.isfinite(out).tolist() == [[False, True, False]]


def greedy_after(logits, **kw):
    row = SamplingRow(
        SamplingParams(temperature=0, **{k: v for k, v in kw.items() if k not in ("out", "prompt")}),
        None,
        kw.get("prompt", []),
        kw.get("out", []),
    )
    return Sampler(eos_token_ids=(0,))(logits.clone()[None], [row]).token_ids[0]


def test_logit_bias_allowed_and_banned_tokens():
    logits = torch.tensor([0.0, 1.0, 5.0, 2.0])
    assert greedy_after(logits, logit_bias={3: 10.0}) == 3
    assert greedy_after(logits, banned_token_ids=[2]) == 3
    assert greedy_after(logits, allowed_token_ids=[0, 1]) == 1


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([9.0, 1.0, 5.0, 2.0])  # eos (0) is the favourite
    assert greedy_after(logits, min_tokens=2, out=[3]) == 2
    assert greedy_after(logits, min_tokens=2, stop_token_ids=[2], out=[3]) == 3
    assert greedy_after(logits, min_tokens=2, out=[3, 3]) == 0


def test_penalties_follow_their_definitions():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    # OpenAI: logit -= frequency * count + presence * (count > 0), over output tokens
    assert greedy_after(logits, frequency_penalty=0.06, out=[1, 1]) == 2  # 3 - 0.12 < 2.9
    assert greedy_after(logits, frequency_penalty=0.04, out=[1, 1]) == 1
    assert greedy_after(logits, presence_penalty=0.2, out=[1]) == 2
    # HF repetition penalty over prompt and output: positive logits divided, negative multiplied
    assert greedy_after(logits, repetition_penalty=1.2, prompt=[1]) == 2  # 3 / 1.2 = 2.5
    row = SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), None, [3], [])
    s = Sampler()
    processed = s._process(torch.tensor([[0.0, 3.0, 2.9, -1.0]]), [row])
    assert processed[0, 3].item() == -2.0


def test_logprobs_are_of_the_models_distribution_with_the_sampled_token_first():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    row = SamplingRow(SamplingParams(temperature=0, logprobs=2, logit_bias={0: 50.0}))
    out = Sampler()(logits, [row])
    lp = torch.log_softmax(logits[0], -1)
    assert out.token_ids == [0]
    (entry,) = out.logprobs
    assert entry[0] == (0, pytest.approx(lp[0].item()))
    assert [t for t, _ in entry[1:]] == [1, 2]
    assert entry[1][1] == pytest.approx(lp[1].item())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {5: 200.0}}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
    ],
)
def test_invalid_processor_values_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs)
