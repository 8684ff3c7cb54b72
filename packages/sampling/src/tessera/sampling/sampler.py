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


@dataclass
class SamplingRow:
    """What the sampler needs of one request this step."""

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    matcher: object | None = None  # an llguidance matcher when the output is constrained
    matcher_vocab: int = 0  # the tokenizer's vocabulary size the matcher masks over


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
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        if constrained:
            # the caller's logits are never written: _process already copied, or copy now
            logits = self._apply_grammars(logits if processed else logits.clone(), rows, constrained)
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

    @staticmethod
    def _apply_grammars(
        logits: torch.Tensor, rows: list[SamplingRow], constrained: list[int]
    ) -> torch.Tensor:
        """Mask, in place, every token the row's grammar forbids next."""
        from llguidance.torch import (
            allocate_token_bitmask,
            apply_token_bitmask_inplace,
            fill_next_token_bitmask,
        )

        vocab = rows[constrained[0]].matcher_vocab
        sub = logits[constrained, :vocab].contiguous()
        mask = allocate_token_bitmask(len(constrained), vocab)
        for j, i in enumerate(constrained):
            fill_next_token_bitmask(rows[i].matcher, mask, j)
        apply_token_bitmask_inplace(sub, mask)
        logits[constrained, :vocab] = sub
        if logits.shape[1] > vocab:  # padding rows of the embedding past the tokenizer's vocab
            logits[constrained, vocab:] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        greedy_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return greedy_ids
        dev = logits.device
        idx_rows = torch.tensor(random_rows, device=dev)
        sub = [params[i] for i in random_rows]
        temp = torch.tensor([p.temperature for p in sub], device=dev, dtype=torch.float32)
        x = logits[idx_rows] / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub):
            x = filter_logits(
                x,
                torch.tensor([p.top_k for p in sub], device=dev),
                torch.tensor([p.top_p for p in sub], device=dev, dtype=torch.float32),
                torch.tensor([p.min_p for p in sub], device=dev, dtype=torch.float32),
            )
        probs = x.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. A seeded row draws its
        # noise from its own generator, seeded for this output position, so its tokens don't
        # depend on the rest of the batch or on how often it was preempted.
        noise = torch.empty_like(probs)
        unseeded = []
        for j, i in enumerate(random_rows):
            g, seed = rows[i].generator, rows[i].params.seed
            if g is None:
                unseeded.append(j)
                continue
            if seed is not None:
                g.manual_seed(draw_seed(seed, len(rows[i].output_token_ids)))
            noise[j].exponential_(generator=g)
        if unseeded:
            idx = torch.tensor(unseeded, device=dev)
            noise[idx] = torch.empty((len(unseeded), probs.shape[1]), device=dev).exponential_()
        sampled = (probs / noise).argmax(dim=-1)
        out = greedy_ids.clone()
        out[idx_rows] = sampled
        return out
