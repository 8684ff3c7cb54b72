"""The draft-model proposer: a smaller model of the same tokenizer guesses the next k tokens, one
batched forward per drafted position, on K/V tensors of its own addressed by the target's block
tables."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tessera.sampling import Sampler, SamplingParams, SamplingRow

from .proposer import Drafts, ProposalRequest

_GREEDY = SamplingParams(temperature=0.0)


class DraftModel(Protocol):
    """The draft as the proposer runs it (the engine implements it over a model of its registry):
    a forward over a ragged batch that writes the K/V of every token it is given."""

    vocab_size: int  # columns of its logits

    def logits(
        self,
        token_ids: Sequence[int],
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        owners: Sequence[object] | None = None,
    ) -> torch.Tensor:
        """fp32 logits ``[len(query_lens), vocab]``, one row per sequence, at its last token.
        Sequence ``i`` computes the last ``query_lens[i]`` of its first ``seq_lens[i]`` tokens
        (``token_ids`` holds them, sequence after sequence), writing their K/V at the slots of
        ``block_tables[i]`` and attending to the K/V written there before. ``owners``: the
        request each sequence is for, where the tokens are its context (a draft whose LM head
        was cut scores them too while the request lives)."""
        ...

    def forget(self, owners: Sequence[object]) -> None:
        """These requests are done (what ``logits`` kept for them may go)."""
        ...


@dataclass
class _State:
    """How far a request's K/V in the draft's tensors is known good: its first ``computed``
    context tokens, and after them the draft tokens written at the last proposal (``pending``),
    good as far as the target kept them."""

    computed: int = 0
    pending: list[int] = field(default_factory=list)


class DraftModelProposer:
    """Drafts greedily with a draft model: each drafted token the most likely one under the
    draft, after the request's logits processors (bias, banned and allowed tokens, penalties,
    min-tokens) and its grammar (whose matcher consumes the draft, then rolls it back), so q is
    one-hot and a seeded request's output is what plain decoding gives it whatever the draft
    proposes (see ``rejection_sample``).

    Per call: a request's draft K/V first catches up with its context (the tokens the target
    accepted since the last proposal, or its whole prompt at the first one), all requests in one
    forward whose last rows give each its first draft token, then one batched forward per further
    drafted position. K/V written for draft tokens stays good as far as the target accepts them.
    A request starts from position 0 even when the target's prefix cache had its prompt: a cached
    block's draft K/V may never have been written (the request that filled it never drafted).

    ``max_catch_up``: the most context tokens one call forwards for catching up (a long prompt
    catches up over several calls, drafting nothing until it has).
    """

    def __init__(self, model: DraftModel, sampler: Sampler | None = None, max_catch_up: int = 2048) -> None:
        if max_catch_up < 1:
            raise ValueError(f"max_catch_up must be at least 1, got {max_catch_up}")
        self.model = model
        self.sampler = sampler or Sampler()
        self.max_catch_up = max_catch_up
        self._states: dict[str, _State] = {}
        # seconds of one forward for one more drafted position (and choosing its tokens),
        # a moving average: what the adaptive policy weighs a drafted token's cost with
        self.forward_seconds = 0.0

    def measure(self, block_table: Sequence[int], num_slots: int, repeats: int) -> None:
        """``forward_seconds`` from one-token forwards at position 0 of ``block_table`` (the
        first one, which pays for first-use set-up, not counted), the fastest of ``repeats``:
        a single slow step measured first would otherwise keep the policy from ever drafting,
        and so from measuring again."""
        if not block_table or num_slots < 1:
            return
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            self.model.logits([0], [1], [1], [block_table]).argmax(dim=-1).tolist()
            times.append(time.perf_counter() - t0)
        self.forward_seconds = min(times[1:])

    def release(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        for rid in request_ids:
            self._states.pop(rid, None)
        self.model.forget(request_ids)

    def _known_good(self, st: _State, ctx: Sequence[int]) -> int:
        """Of ``ctx``, how many first tokens have good K/V in the draft's tensors: ``computed``,
        and the pending draft tokens after it as far as the target kept them."""
        c = min(st.computed, len(ctx))
        for tok in st.pending:  # written at c, c + 1, ...: good where the target kept them
            if c < len(ctx) and ctx[c] == tok:
                c += 1
            else:
                break
        return c

    def catch_up_tokens(self, request: ProposalRequest) -> int:
        st = self._states.get(request.request_id)
        good = self._known_good(st, request.token_ids) if st is not None else 0
        return max(0, len(request.token_ids) - 1 - good)

    def draft(self, requests: Sequence[ProposalRequest], ks: Sequence[int]) -> Drafts:
        if len(requests) != len(ks):
            raise ValueError(f"{len(requests)} requests and {len(ks)} values of k")
        out: list[list[int]] = [[] for _ in requests]
        budget = self.max_catch_up
        # the first forward: per request the context it has not yet seen
        ids: list[int] = []
        qlens: list[int] = []
        slens: list[int] = []
        tables: list[Sequence[int]] = []
        owners: list[str] = []
        drafting: list[tuple[int, int, int]] = []  # (row of the first forward, request index, k)
        for i, (r, k) in enumerate(zip(requests, ks, strict=True)):
            if k <= 0:
                continue
            st = self._states.setdefault(r.request_id, _State())
            ctx, n_ctx = r.token_ids, len(r.token_ids)
            # the last token goes in: its logits give the first draft token
            c = min(self._known_good(st, ctx), n_ctx - 1)
            st.computed, st.pending = c, []
            k = min(k, r.num_slots - n_ctx + 1)  # draft token j's K/V goes at n_ctx + j - 1
            if k <= 0 or budget <= 0:
                continue
            n = n_ctx - c
            if n > budget:  # a long catch-up: part of it now, the draft at a later step
                n = budget
                st.computed = c + n
                k = 0
            budget -= n
            ids.extend(ctx[c : c + n])
            qlens.append(n)
            slens.append(c + n)
            tables.append(r.block_table)
            owners.append(r.request_id)
            if k:
                drafting.append((len(qlens) - 1, i, k))
                st.computed = n_ctx
        if not qlens:
            return Drafts(out)
        logits = self.model.logits(ids, qlens, slens, tables, owners=owners)
        if not drafting:
            return Drafts(out)
        logits = logits[torch.tensor([row for row, _, _ in drafting])]
        consumed = dict.fromkeys((i for _, i, _ in drafting), 0)  # tokens a grammar matcher took
        try:
            self._draft_loop(requests, [(i, k) for _, i, k in drafting], logits, out, consumed)
        finally:  # each grammar matcher back where the request left it
            for i, n in consumed.items():
                matcher = requests[i].row.matcher if n else None
                if matcher is not None and not matcher.is_error() and not matcher.rollback(n):
                    raise RuntimeError(f"the grammar matcher could not roll back {n} draft tokens")
        for _, i, _ in drafting:
            # the last draft token never went in; the ones before it did
            self._states[requests[i].request_id].pending = out[i][:-1]
        return Drafts(out)

    def _draft_loop(self, requests, live, logits, out, consumed) -> None:
        """Draft position after position for the ``live`` (request index, k) pairs, from the
        first forward's ``logits``, into ``out``; a constrained request's matcher consumes each
        drafted token (``consumed`` counts them, for the caller to roll back)."""
        eos = set(self.sampler.eos_token_ids)
        t0 = None
        while True:
            toks = self._choose(logits, [requests[i] for i, _ in live], [out[i] for i, _ in live])
            if t0 is not None:  # the tokens are on the host: the forward has finished
                dt = time.perf_counter() - t0
                prev = self.forward_seconds
                self.forward_seconds = dt if not prev else 0.8 * prev + 0.2 * dt
            still = []
            for (i, k), tok in zip(live, toks, strict=True):
                out[i].append(tok)
                more = len(out[i]) < k and tok not in eos
                matcher = requests[i].row.matcher if requests[i].row is not None else None
                if more and matcher is not None:
                    # past a token the grammar refuses, or its end, nothing more can be accepted
                    more = not matcher.is_stopped() and matcher.consume_token(tok)
                    consumed[i] += more
                if more:
                    still.append((i, k))
            if not still:
                return
            live = still
            t0 = time.perf_counter()
            # draft token j (1-based) goes in at position len(context) + j - 1
            logits = self.model.logits(
                [out[i][-1] for i, _ in live],
                [1] * len(live),
                [len(requests[i].token_ids) + len(out[i]) for i, _ in live],
                [requests[i].block_table for i, _ in live],
            )

    def _choose(
        self, logits: torch.Tensor, requests: Sequence[ProposalRequest], drafted: Sequence[list[int]]
    ) -> list[int]:
        """The most likely next token of each row under the draft, after the request's
        processors (which see the tokens drafted before it as output) and its grammar's mask
        (its matcher has consumed those tokens)."""
        rows = [
            SamplingRow(
                r.row.params,
                None,
                r.row.prompt_token_ids,
                r.row.output_token_ids + d,
                r.row.matcher,
                r.row.matcher_vocab,
            )
            if r.row is not None
            else None
            for r, d in zip(requests, drafted, strict=True)
        ]
        if any(row is not None for row in rows):
            rows = [row if row is not None else SamplingRow(_GREEDY) for row in rows]
            logits = self.sampler.processed_logits(logits, rows)
        return logits.argmax(dim=-1).tolist()
