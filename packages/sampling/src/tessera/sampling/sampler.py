"""The batched sampler: every row its own temperature, top-k, top-p, min-p and seed."""

from __future__ import annotations

import torch

from .params import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside its row's top-k, nucleus (top-p) and min-p sets.

    top_k <= 0 keeps all; top_p = 1 keeps all; min_p = 0 keeps all. The most likely token is
    always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    remove = ranks >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already cover top_p
    remove |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    remove |= probs < (min_p[:, None] * probs[:, :1])
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Token ids ``[B]`` from float logits ``[B, V]``."""
        greedy_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return greedy_ids
        dev = logits.device
        rows = torch.tensor(random_rows, device=dev)
        sub = [params[i] for i in random_rows]
        temp = torch.tensor([p.temperature for p in sub], device=dev, dtype=torch.float32)
        x = logits[rows].float() / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub):
            x = filter_logits(
                x,
                torch.tensor([p.top_k for p in sub], device=dev),
                torch.tensor([p.top_p for p in sub], device=dev, dtype=torch.float32),
                torch.tensor([p.min_p for p in sub], device=dev, dtype=torch.float32),
            )
        probs = x.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. A seeded row draws its
        # noise from its own generator, so its tokens don't depend on the rest of the batch.
        noise = torch.empty_like(probs)
        unseeded = []
        for j, i in enumerate(random_rows):
            g = generators[i]
            if g is None:
                unseeded.append(j)
            else:
                noise[j].exponential_(generator=g)
        if unseeded:
            idx = torch.tensor(unseeded, device=dev)
            noise[idx] = torch.empty((len(unseeded), probs.shape[1]), device=dev).exponential_()
        sampled = (probs / noise).argmax(dim=-1)
        out = greedy_ids.clone()
        out[rows] = sampled
        return out
