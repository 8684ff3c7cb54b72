"""Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"): which draft
tokens to keep, and the token after them, so that the output has the target's distribution."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import torch

from tessera.sampling import SamplingRow, draw_seed, exponential_race


class SpeculativeOutput(msgspec.Struct):
    """Per request: how many of its draft tokens were accepted, and its new tokens (those accepted
    draft tokens and one more: ``num_accepted[i] + 1`` tokens)."""

    num_accepted: list[int]
    token_ids: list[list[int]]


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: Sequence[Sequence[int]],
    rows: Sequence[SamplingRow],
    draft_probs: torch.Tensor | None = None,
) -> SpeculativeOutput:
    """Verify a batch of drafts against the target's distributions.

    Request ``i`` (``rows[i]``, its state before the draft) proposed ``k_i`` tokens x_1..x_k, x_j
    drawn from q_j. ``target_probs`` holds, for each request in turn, ``k_i + 1`` rows p_1..p_{k+1}:
    p_j is the target's processed distribution after the context and x_1..x_{j-1}
    (``Sampler.probabilities`` of ``speculative_rows(rows[i], draft)``). ``draft_probs`` holds, for
    each request in turn, its ``k_i`` rows q_j, or is None for a deterministic proposer such as
    n-gram (q_j one-hot at x_j). Requests may have different k, also 0.

    The rule: for j = 1..k accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the first
    rejection emit y ~ max(0, p_j - q_j) / Z and stop; when all k are accepted emit y ~ p_{k+1}.
    Every emitted token then has the target's law: P(emit y at j) = min(p(y), q(y)) +
    (1 - sum_x min(p(x), q(x))) max(0, p(y) - q(y)) / Z = p(y), since
    Z = sum_x max(0, p(x) - q(x)) = 1 - sum_x min(p(x), q(x)). The expected acceptance of x_j is
    sum_x min(p_j(x), q_j(x)).

    With q one-hot (``draft_probs`` None) the rule reads: accept x_j with probability p_j(x_j), else
    emit y ~ p_j conditioned on y != x_j. It is carried out by drawing y_j ~ p_j exactly as the
    plain sampler would at that output position (the same exponential race and, for a seeded
    request, the same noise) and accepting x_j iff y_j == x_j: the same law, and a seeded request
    gets the very tokens plain decoding gives it, whatever was drafted.

    Greedy rows (p one-hot at the argmax) take the fast path: accept while x_j is the argmax of
    p_j, then emit the argmax. Randomness: a seeded request's draws at output position n (n =
    ``len(rows[i].output_token_ids) + j``) come from its generator reseeded with
    ``draw_seed(seed, n)``: first the race's noise, then the acceptance uniform; so its tokens do
    not depend on the batch. Other rows draw from torch's global generator.
    """
    n_req = len(rows)
    if len(draft_token_ids) != n_req:
        raise ValueError(f"draft_token_ids has {len(draft_token_ids)} requests, rows has {n_req}")
    ks = [len(d) for d in draft_token_ids]
    n_draft = sum(ks)
    if target_probs.dim() != 2 or target_probs.shape[0] != n_draft + n_req:
        raise ValueError(
            f"target_probs must be [sum(k + 1), vocab] = [{n_draft + n_req}, vocab], "
            f"got {tuple(target_probs.shape)}"
        )
    vocab = target_probs.shape[1]
    if draft_probs is not None and tuple(draft_probs.shape) != (n_draft, vocab):
        raise ValueError(
            f"draft_probs must be [sum(k), vocab] = [{n_draft}, {vocab}], got {tuple(draft_probs.shape)}"
        )
    flat = [t for d in draft_token_ids for t in d]
    if flat and (min(flat) < 0 or max(flat) >= vocab):
        bad = next(t for t in flat if not 0 <= t < vocab)
        raise ValueError(f"draft token id {bad} is outside the vocabulary (0..{vocab - 1})")
    if n_req == 0:
        return SpeculativeOutput([], [])

    dev = target_probs.device
    k_t = torch.tensor(ks, device=dev)
    req = torch.arange(n_req, device=dev)
    target_start = torch.cumsum(k_t + 1, 0) - (k_t + 1)
    draft_req = torch.repeat_interleave(req, k_t)  # the request of each draft token
    draft_j = torch.arange(n_draft, device=dev) - (torch.cumsum(k_t, 0) - k_t)[draft_req]
    draft_target_row = target_start[draft_req] + draft_j  # the row of p that judges it
    drafts = torch.tensor(flat, dtype=torch.long, device=dev)

    # the token each target row emits if the request stops there: greedy rows the argmax
    emit = target_probs.argmax(dim=-1)
    is_random_list = [not r.params.greedy for r in rows]
    random_req = [i for i, random in enumerate(is_random_list) if random]
    # seeded rows, numbered among the random requests' target rows
    generators: dict[int, tuple[torch.Generator, int | None]] = {}
    local = 0
    for i in random_req:
        g, seed, pos = rows[i].generator, rows[i].params.seed, len(rows[i].output_token_ids)
        if g is not None:
            for j in range(ks[i] + 1):
                generators[local + j] = (g, None if seed is None else draw_seed(seed, pos + j))
        local += ks[i] + 1
    accept = drafts == emit[draft_target_row]
    if random_req:
        is_random = torch.tensor(is_random_list, device=dev)
        target_random = is_random.repeat_interleave(k_t + 1)
        random_rows = target_random.nonzero()[:, 0]
        if draft_probs is None:
            every = len(random_req) == n_req  # then no copy: the race only reads its input
            emit[random_rows] = exponential_race(
                target_probs if every else target_probs[random_rows], generators
            )
            accept = drafts == emit[draft_target_row]
        else:
            local_of = torch.cumsum(target_random, 0) - 1  # target row -> index among random_rows
            rd = is_random[draft_req].nonzero()[:, 0]  # draft tokens of random requests
            lt = local_of[draft_target_row[rd]]
            emit[random_rows], accept[rd] = _residual_race(
                target_probs[random_rows], draft_probs[rd], drafts[rd], lt, generators
            )  # indexing copies target_probs: the caller's tensor is never written
    # the first rejected j, or k when none was
    n_accepted = k_t.clone().scatter_reduce_(
        0, draft_req, torch.where(accept, k_t[draft_req], draft_j), reduce="amin"
    )
    last = emit[target_start + n_accepted]
    n_list, last_list = n_accepted.tolist(), last.tolist()
    return SpeculativeOutput(
        n_list, [list(d[:n]) + [y] for d, n, y in zip(draft_token_ids, n_list, last_list, strict=True)]
    )


def _residual_race(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    draft_rows: torch.Tensor,
    generators: dict[int, tuple[torch.Generator, int | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """For target rows ``p`` of random requests (a copy this function overwrites) and the draft
    tokens judged by rows ``draft_rows`` of it (drawn from ``q``): the token each row emits (from
    the residual max(0, p - q) at a draft position, from p at a bonus position) and whether each
    draft token is accepted (u < p(x) / q(x), u ~ U[0, 1))."""
    noise = torch.empty_like(p).exponential_()
    u = torch.rand(p.shape[0], device=p.device, dtype=p.dtype)
    for r, (g, seed) in generators.items():
        if seed is not None:
            g.manual_seed(seed)
        noise[r].exponential_(generator=g)  # first, as the plain sampler's draw at this position
        u[r : r + 1].uniform_(generator=g)
    q = q.to(p.dtype)
    px = p[draft_rows, drafts]
    qx = q[torch.arange(drafts.shape[0], device=p.device), drafts]
    accept = u[draft_rows] * qx < px
    residual = p[draft_rows].sub_(q).clamp_min_(0)
    # p == q leaves no residual, and then no rejection either (but for rounding): keep p there
    some = residual.sum(dim=-1) > 0
    p[draft_rows[some]] = residual[some]
    return torch.div(p, noise, out=noise).argmax(dim=-1), accept
