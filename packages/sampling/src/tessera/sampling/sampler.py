"""The batched sampler: every row its own logit processors, temperature, top-k, top-p, min-p
and seed, and the logprobs of what it picked."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .params import SamplingParams

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed & _MASK64)
    return g


def draw_seed(seed: int, step: int) -> int:
    """The seed of a seeded request's draw for its output token ``step``: splitmix64 of the two,
    so the draw depends on them alone (not on the batch, nor on a preemption that rebuilt the
    request's state and its generator)."""
    z = ((seed & _MASK64) + (step + 1) * 0x9E37_79B9_7F4A_7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _MASK64
    return z ^ (z >> 31)


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


def exponential_race(
    probs: torch.Tensor, generators: dict[int, tuple[torch.Generator, int | None]] | None = None
) -> torch.Tensor:
    """One token per row of ``probs`` ``[B, V]`` (a distribution up to a positive factor per row).

    Exponential race: with E_x ~ Exp(1) i.i.d., P(argmax_x p_x / E_x = y) = p_y / sum_x p_x, since
    E_x / p_x ~ Exp(p_x) and the first of independent exponential clocks rings with probability
    its rate over the total. Row ``r`` listed in ``generators`` draws its noise from that generator,
    first reseeded with the given seed when there is one; the other rows from torch's global
    generator.
    """
    noise = torch.empty_like(probs).exponential_()
    for r, (g, seed) in (generators or {}).items():
        if seed is not None:
            g.manual_seed(seed)
        noise[r].exponential_(generator=g)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


@dataclass
class SamplingRow:
    """What the sampler needs of one request this step."""

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    matcher: object | None = None  # an llguidance matcher when the output is constrained
    matcher_vocab: int = 0  # the tokenizer's vocabulary size the matcher masks over
    # an llguidance bitmask ``[ceil(matcher_vocab / 32)]`` int32 computed ahead (the rows that verify
    # a speculative draft, tessera.sampling.speculative); used instead of asking a matcher
    token_bitmask: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: None, or [(sampled id, logprob), (top id, logprob), ...] from the model's own
    # distribution (before any processing), as OpenAI reports them
    logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.eos_token_ids = tuple(eos_token_ids)

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Apply each row's allowed/banned tokens, logit bias, min-tokens and penalties."""
        vocab = logits.shape[-1]
        for i, row in enumerate(rows):
            p = row.params
            x = logits[i]
            if p.allowed_token_ids is not None:
                keep = torch.zeros(vocab, dtype=torch.bool, device=x.device)
                keep[torch.tensor(p.allowed_token_ids, device=x.device)] = True
                x.masked_fill_(~keep, float("-inf"))
            if p.banned_token_ids:
                x[torch.tensor(p.banned_token_ids, device=x.device)] = float("-inf")
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=x.device)
                x[ids] += torch.tensor(list(p.logit_bias.values()), device=x.device, dtype=x.dtype)
            if len(row.output_token_ids) < p.min_tokens:
                stop = [*p.stop_token_ids, *([] if p.ignore_eos else self.eos_token_ids)]
                if stop:
                    x[torch.tensor(stop, device=x.device)] = float("-inf")
            if p.uses_penalties:
                out = torch.tensor(row.output_token_ids, dtype=torch.long, device=x.device)
                if p.repetition_penalty != 1.0:
                    seen = torch.tensor(
                        row.prompt_token_ids + row.output_token_ids, dtype=torch.long, device=x.device
                    )
                    seen = seen.unique()
                    vals = x[seen]
                    x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
                if out.numel() and (p.presence_penalty or p.frequency_penalty):
                    counts = torch.bincount(out, minlength=vocab)[:vocab].to(x.dtype)
                    x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
        return logits

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Token ids from float logits ``[B, V]`` (one row per request)."""
        logits = logits.float()
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = self._processed(logits, rows)
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        tokens = self._sample(logits, rows)
        for i in constrained:
            rows[i].matcher.consume_token(int(tokens[i]))
        logprobs: list[list[tuple[int, float]] | None] = [None] * len(rows)
        if raw_logprobs is not None:
            token_list = tokens.tolist()
            for i, row in enumerate(rows):
                if not want_logprobs[i]:
                    continue
                lp = raw_logprobs[i]
                entry = [(token_list[i], float(lp[token_list[i]]))]
                k = row.params.logprobs
                if k:
                    top = lp.topk(k)
                    entry += list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                logprobs[i] = entry
        return SamplerOutput(tokens.tolist(), logprobs)

    def probabilities(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The distribution ``[B, V]`` (float32) that a call with these logits and rows draws each
        row's token from: after the row's processors and grammar mask, its temperature, top-k,
        top-p and min-p; one-hot at the argmax for a greedy row. No matcher is advanced.

        For speculative verification pass the rows of tessera.sampling.speculative_rows, one per
        verified position."""
        logits = self._processed(logits.float(), rows)
        probs = torch.zeros_like(logits)
        probs.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            probs[idx] = self._random_probs(logits, rows, random_rows)
        return probs

    def processed_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Float logits ``[B, V]`` after each row's processors (allowed, banned and biased
        tokens, min-tokens, penalties) and grammar mask, before temperature and truncation: their
        argmax is the token a greedy row samples. No matcher is advanced; the caller's tensor is
        never written."""
        return self._processed(logits.float(), rows)

    def _processed(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Float logits after every row's processors and grammar mask; a copy when anything
        applies (the caller's tensor is never written)."""
        processed = any(
            r.params.allowed_token_ids is not None
            or r.params.banned_token_ids
            or r.params.logit_bias
            or r.params.uses_penalties
            or len(r.output_token_ids) < r.params.min_tokens
            for r in rows
        )
        if processed:
            logits = self._process(logits.clone(), rows)
        masked = [i for i, r in enumerate(rows) if r.matcher is not None or r.token_bitmask is not None]
        if masked:
            logits = self._apply_grammars(logits if processed else logits.clone(), rows, masked)
        return logits

    @staticmethod
    def _apply_grammars(logits: torch.Tensor, rows: list[SamplingRow], masked: list[int]) -> torch.Tensor:
        """Mask, in place, every token the row's grammar forbids next."""
        from llguidance.torch import (
            allocate_token_bitmask,
            apply_token_bitmask_inplace,
            fill_next_token_bitmask,
        )

        vocab = rows[masked[0]].matcher_vocab
        sub = logits[masked, :vocab].contiguous()
        mask = allocate_token_bitmask(len(masked), vocab)
        for j, i in enumerate(masked):
            if rows[i].token_bitmask is not None:
                mask[j] = rows[i].token_bitmask
            else:
                fill_next_token_bitmask(rows[i].matcher, mask, j)
        apply_token_bitmask_inplace(sub, mask)
        logits[masked, :vocab] = sub
        if logits.shape[1] > vocab:  # padding rows of the embedding past the tokenizer's vocab
            logits[masked, vocab:] = float("-inf")
        return logits

    @staticmethod
    def _random_probs(logits: torch.Tensor, rows: list[SamplingRow], random_rows: list[int]) -> torch.Tensor:
        """softmax(filter(logits / temperature)) of the non-greedy rows, in ``random_rows`` order."""
        dev = logits.device
        sub = [rows[i].params for i in random_rows]
        temp = torch.tensor([p.temperature for p in sub], device=dev, dtype=torch.float32)
        x = logits[torch.tensor(random_rows, device=dev)] / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub):
            x = filter_logits(
                x,
                torch.tensor([p.top_k for p in sub], device=dev),
                torch.tensor([p.top_p for p in sub], device=dev, dtype=torch.float32),
                torch.tensor([p.min_p for p in sub], device=dev, dtype=torch.float32),
            )
        return x.softmax(dim=-1)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy_ids = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not random_rows:
            return greedy_ids
        probs = self._random_probs(logits, rows, random_rows)
        # A seeded row draws its noise from its own generator, seeded for this output position,
        # so its tokens don't depend on the rest of the batch or on how often it was preempted.
        generators = {}
        for j, i in enumerate(random_rows):
            g, seed = rows[i].generator, rows[i].params.seed
            if g is not None:
                position = len(rows[i].output_token_ids)
                generators[j] = (g, None if seed is None else draw_seed(seed, position))
        out = greedy_ids.clone()
        out[torch.tensor(random_rows, device=logits.device)] = exponential_race(probs, generators)
        return out
