"""Exactness of the rejection sampler: with speculation the first two output tokens have the
target's joint distribution, written here from the definitions of the sampling settings (not
taken from tessera's sampler), for a random tiny target and a random tiny draft of moderate
acceptance, and for n-gram drafts."""

from functools import cache

import pytest
import torch
from scipy import stats

from tessera.sampling import Sampler, SamplingParams, SamplingRow, make_generator, speculative_rows
from tessera.spec_decode import NgramProposer, rejection_sample

VOCAB = 6
EOS = 0
PROMPT = [1, 2, 5, 4, 1, 2]
_g = torch.Generator().manual_seed(11)
# bigram models: the next token's logits are a row chosen by the last token
TARGET = torch.randn(VOCAB, VOCAB, generator=_g) * 1.5
DRAFT = TARGET + torch.randn(VOCAB, VOCAB, generator=_g) * 2.0

SETTINGS = {
    "plain": SamplingParams(temperature=0.9),
    "top_k_top_p": SamplingParams(temperature=1.0, top_k=4, top_p=0.85),
    "penalised": SamplingParams(
        temperature=1.0, presence_penalty=0.6, frequency_penalty=0.5, repetition_penalty=1.4, min_tokens=1
    ),
}


def reference_probs(output: list[int], p: SamplingParams) -> torch.Tensor:
    """The target's distribution after PROMPT + output, from the definitions: min-tokens bans EOS
    until that many tokens are out; HF's repetition penalty divides a positive and multiplies a
    negative logit of every token seen; OpenAI's penalties subtract frequency * count + presence
    * (count > 0) over the output; then temperature; top-k keeps the k most likely; top-p keeps
    the most likely tokens until their mass reaches top_p; softmax over what is kept."""
    x = TARGET[(PROMPT + output)[-1]].double().clone()
    if len(output) < p.min_tokens:
        x[EOS] = float("-inf")
    for t in set(PROMPT + output):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    x = x / p.temperature
    order = sorted(range(VOCAB), key=lambda t: -x[t].item())
    kept = order[: p.top_k] if p.top_k > 0 else order
    probs = torch.softmax(x[kept], -1).tolist()
    keep, mass = [], 0.0
    for t, q in zip(kept, probs, strict=True):
        if keep and mass >= p.top_p:
            break
        keep.append(t)
        mass += q
    out = torch.full((VOCAB,), float("-inf"), dtype=torch.float64)
    out[keep] = x[keep]
    return torch.softmax(out, -1)


def draft_tokens(outputs: list[list[int]], ks: list[int], gen: torch.Generator):
    """Tokens of the draft bigram model, sampled from q, and q's rows (one per draft token)."""
    last = torch.tensor([(PROMPT + o)[-1] for o in outputs])
    tokens, qs = [], []
    for _ in range(max(ks)):
        q = torch.softmax(DRAFT[last], -1)
        last = torch.multinomial(q, 1, generator=gen)[:, 0]
        tokens.append(last)
        qs.append(q)
    tokens, qs = torch.stack(tokens, 1), torch.stack(qs, 1)  # [N, kmax], [N, kmax, V]
    drafts = [t[:k] for t, k in zip(tokens.tolist(), ks, strict=True)]
    mask = torch.arange(max(ks))[None, :] < torch.tensor(ks)[:, None]
    return drafts, qs[mask]


def target_probs(rows: list[SamplingRow], drafts: list[list[int]], sampler: Sampler) -> torch.Tensor:
    """Sampler.probabilities of every verification row; identical contexts computed once."""
    verify = [r for row, d in zip(rows, drafts, strict=True) for r in speculative_rows(row, d)]
    keys = [tuple(r.output_token_ids) for r in verify]
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    unique_rows = [verify[i] for i in first.values()]
    logits = TARGET[[(PROMPT + list(key))[-1] for key in first]]
    probs = sampler.probabilities(logits, unique_rows)
    index = {key: j for j, key in enumerate(first)}
    return probs[[index[k] for k in keys]]


@cache
def simulate(setting: str, proposer: str, n: int = 12000, seed: int = 0):
    """n identical requests, speculative steps until each has 2 tokens: (first two tokens of each
    request, per request of the first step: its draft length and whether its first draft token
    was accepted)."""
    params = SETTINGS[setting]
    sampler = Sampler(eos_token_ids=(EOS,))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ngram = NgramProposer(1, 2, 3)
    outputs: list[list[int]] = [[] for _ in range(n)]
    first_step = None
    while True:
        todo = [i for i, o in enumerate(outputs) if len(o) < 2]
        if not todo:
            break
        ks = [1 + (i % 3) for i in todo]  # ragged: k = 1, 2, 3
        rows = [SamplingRow(params, None, PROMPT, outputs[i]) for i in todo]
        if proposer == "draft_model":
            drafts, q = draft_tokens([outputs[i] for i in todo], ks, gen)
        else:
            drafts, q = ngram.propose_batch([PROMPT + outputs[i] for i in todo], k=ks), None
        out = rejection_sample(target_probs(rows, drafts, sampler), drafts, rows, q)
        if first_step is None:
            first_step = (drafts, out.num_accepted)
        for i, toks in zip(todo, out.token_ids, strict=True):
            outputs[i] = outputs[i] + toks
    return [tuple(o[:2]) for o in outputs], first_step


def chisquare(counts: dict, expected: dict, n: int) -> float:
    """Pearson's test; cells expected fewer than 5 times pooled into one."""
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for cell, p in expected.items():
        if p * n < 5:
            pool_o, pool_e = pool_o + counts.get(cell, 0), pool_e + p * n
        else:
            obs.append(counts.get(cell, 0))
            exp.append(p * n)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    assert sum(obs) == n, "a sample fell outside the support of the target"
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("proposer", ["draft_model", "ngram"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_first_two_tokens_have_the_targets_joint_distribution(setting, proposer):
    pairs, _ = simulate(setting, proposer)
    n, params = len(pairs), SETTINGS[setting]
    p1 = reference_probs([], params)
    joint = {
        (a, b): (p1[a] * reference_probs([a], params)[b]).item() for a in range(VOCAB) for b in range(VOCAB)
    }
    first = {(a,): p1[a].item() for a in range(VOCAB)}
    count_first: dict = {}
    count_joint: dict = {}
    for pair in pairs:
        count_first[pair[:1]] = count_first.get(pair[:1], 0) + 1
        count_joint[pair] = count_joint.get(pair, 0) + 1
    p_first, p_joint = chisquare(count_first, first, n), chisquare(count_joint, joint, n)
    print(f"\n{setting}/{proposer}: n={n} first-token p={p_first:.3g} joint p={p_joint:.3g}")
    assert p_first > 1e-4 and p_joint > 1e-4  # a real bias gives p ~ 0 at this sample size


@pytest.mark.parametrize("proposer", ["draft_model", "ngram"])
def test_the_first_draft_token_is_accepted_with_probability_sum_of_min_p_q(proposer):
    """Theory: P(accept x_1) = sum_x min(p(x), q(x)); q one-hot at x_1 (n-gram) gives p(x_1)."""
    _, (drafts, accepted) = simulate("plain", proposer)
    p = reference_probs([], SETTINGS["plain"])
    if proposer == "draft_model":
        q = torch.softmax(DRAFT[PROMPT[-1]].double(), -1)
        theory = torch.minimum(p, q).sum().item()
    else:
        (x1,) = {d[0] for d in drafts}  # every request drafts the same first token
        theory = p[x1].item()
    hits = sum(a >= 1 for a in accepted)
    pvalue = stats.binomtest(hits, len(accepted), theory).pvalue
    print(f"\n{proposer}: accepted {hits}/{len(accepted)} = {hits / len(accepted):.4f}, theory {theory:.4f}")
    assert 0.2 < theory < 0.9  # moderate acceptance: both branches of the rule are exercised
    assert pvalue > 1e-4


def greedy_chain(output: list[int], length: int) -> list[int]:
    chain = []
    for _ in range(length):
        chain.append(int(TARGET[(PROMPT + output + chain)[-1]].argmax()))
    return chain


@pytest.mark.parametrize("with_q", [False, True])
def test_greedy_requests_keep_the_argmax_chain_exactly(with_q):
    params = SamplingParams(temperature=0)
    chain = greedy_chain([], 5)
    wrong = lambda t: (t + 1) % VOCAB  # noqa: E731
    drafts = [chain[:4], chain[:2] + [wrong(chain[2])] + chain[3:4], [wrong(chain[0])], [], chain[:3]]
    rows = [SamplingRow(params, None, PROMPT, []) for _ in drafts]
    probs = target_probs(rows, drafts, Sampler())
    q = torch.softmax(torch.randn(sum(map(len, drafts)), VOCAB), -1) if with_q else None
    out = rejection_sample(probs, drafts, rows, q)
    assert out.num_accepted == [4, 2, 0, 0, 3]
    assert out.token_ids == [chain[:5], chain[:3], chain[:1], chain[:1], chain[:4]]


def run_seeded(batch: list[tuple[SamplingParams, list[int]]], with_q: bool) -> list[list[int]]:
    rows = [SamplingRow(p, make_generator(p.seed, torch.device("cpu")), PROMPT, [3]) for p, _ in batch]
    drafts = [d for _, d in batch]
    probs = target_probs(rows, drafts, Sampler())
    # q of each draft token: the draft model's distribution after the context and the tokens before it
    lasts = [(PROMPT + [3] + d[:j])[-1] for d in drafts for j in range(len(d))]
    q = torch.softmax(DRAFT[lasts], -1) if with_q else None
    return rejection_sample(probs, drafts, rows, q).token_ids


@pytest.mark.parametrize("with_q", [False, True])
def test_a_seeded_request_gets_the_same_tokens_in_any_batch(with_q):
    me = (SamplingParams(temperature=1.0, seed=1234), [4, 1, 2])
    others = [
        (SamplingParams(temperature=0.7), [1, 1]),
        (SamplingParams(temperature=1.2, seed=5), [2, 5, 5, 1]),
        (SamplingParams(temperature=0), [3]),
    ]
    alone = run_seeded([me], with_q)[0]
    assert run_seeded([others[0], me, others[1]], with_q)[1] == alone
    assert run_seeded([*others, me], with_q)[3] == alone
    # and the draws do depend on the seed
    draws = {
        tuple(run_seeded([(SamplingParams(temperature=1.0, seed=s), [4, 1, 2])], with_q)[0])
        for s in range(12)
    }
    assert len(draws) > 1


def test_with_ngram_drafts_a_seeded_request_gets_exactly_the_tokens_of_plain_decoding():
    """q one-hot: the verifier draws each position as the plain sampler would (same seeded
    noise), so the tokens are those of decoding without speculation, whatever was drafted."""
    params = SamplingParams(temperature=1.0, seed=77, presence_penalty=0.3)
    cpu = torch.device("cpu")
    plain: list[int] = []
    for _ in range(12):
        row = SamplingRow(params, make_generator(77, cpu), PROMPT, list(plain))
        plain += Sampler()(TARGET[[(PROMPT + plain)[-1]]], [row]).token_ids
    ngram = NgramProposer(1, 3, 4)
    for k in (1, 2, 4):
        out: list[int] = []
        while len(out) < 12:
            row = SamplingRow(params, make_generator(77, cpu), PROMPT, list(out))
            draft = ngram.propose(PROMPT + out, k=k)
            out += rejection_sample(target_probs([row], [draft], Sampler()), [draft], [row]).token_ids[0]
        assert out[:12] == plain


def test_bad_shapes_are_refused_by_name():
    row = SamplingRow(SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="target_probs must be"):
        rejection_sample(torch.rand(2, VOCAB), [[1, 2]], [row])
    with pytest.raises(ValueError, match="draft_probs must be"):
        rejection_sample(torch.rand(3, VOCAB), [[1, 2]], [row], torch.rand(1, VOCAB))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rejection_sample(torch.rand(3, VOCAB), [[1, VOCAB]], [row])
    with pytest.raises(ValueError, match="requests, rows has"):
        rejection_sample(torch.rand(3, VOCAB), [[1, 2]], [row, row])
