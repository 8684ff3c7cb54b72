"""SamplingParams validation and the batched sampler (exact tests of the distributions)."""

import pytest
import torch
from scipy import stats

from tessera.sampling import Sampler, SamplingParams, filter_logits, make_generator


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
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_a_seeded_row_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    p = SamplingParams(temperature=1.0, seed=1234)

    def draw(batch_rows):
        gens = [make_generator(1234, torch.device("cpu")) if i == 0 else None for i in range(len(batch_rows))]
        params = [p] + [SamplingParams(temperature=0.7)] * (len(batch_rows) - 1)
        return [int(Sampler()(logits[batch_rows], params, gens)[0]) for _ in range(1)]

    alone = [int(Sampler()(logits[:1], [p], [make_generator(1234, torch.device("cpu"))])[0])]
    assert draw([0, 1, 2, 3]) == alone == draw([0, 3])


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
    samples = Sampler()(logits.expand(n, -1).contiguous(), [params] * n, [None] * n)
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
