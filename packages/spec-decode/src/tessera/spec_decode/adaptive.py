"""How many tokens to draft for a request this step: from its own measured acceptance and from
what verification costs at the current batch size, none when speculation would not pay."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Acceptance:
    """A request's acceptance so far: of the draft tokens verification judged, those accepted,
    older verifications weighing less (each one multiplies the past by ``decay``), starting from
    one accepted of two. A verification of k drafts that accepts n judged n + 1 of them when
    n < k (those after the first rejection were never judged) and k when n = k: so ``rate``
    estimates the chance that a draft token is accepted once reached, which ``expected_tokens``
    takes (accepted / drafted, the rate reported to users, is lower: 0.77 for 0.9 at k = 4)."""

    drafted: float = 2.0
    accepted: float = 1.0
    steps_without_draft: int = 0
    # the same for drafts that continue a draft accepted whole (copying a stretch of the prompt,
    # easy text): accepted far more often than drafts after a rejection, so they are estimated
    # apart, and a run of full accepts can draft longer
    run_drafted: float = 2.0
    run_accepted: float = 1.8
    in_run: bool = False  # the last draft was accepted whole, and drafting went on from it

    @property
    def rate(self) -> float:
        if self.in_run:
            return self.run_accepted / self.run_drafted
        return self.accepted / self.drafted

    def update(self, drafted: int, accepted: int, decay: float, runs: bool = True) -> None:
        """Count a verification of ``drafted`` tokens that accepted ``accepted``; with ``runs``,
        into the run estimate where it continued a draft accepted whole."""
        if drafted:
            judged = accepted + (accepted < drafted)
            if runs and self.in_run:
                self.run_drafted = self.run_drafted * decay + judged
                self.run_accepted = self.run_accepted * decay + accepted
            else:
                self.drafted = self.drafted * decay + judged
                self.accepted = self.accepted * decay + accepted
            self.in_run = runs and accepted == drafted

    def break_run(self) -> None:
        """A step without a draft: the next one starts afresh."""
        self.in_run = False


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a verification of ``k`` drafts yields when each is accepted with probability
    ``rate`` until the first rejection, counting the token sampled after them: 1 + a + ... + a^k."""
    return float(k + 1) if rate >= 1.0 else (1.0 - rate ** (k + 1)) / (1.0 - rate)


CATCH_UP_HORIZON = 64  # tokens over which a draft model's catch-up must pay for itself


class AdaptivePolicy:
    """k for each request and step.

    Cost model: with ``B`` decoding requests drafting ``k`` tokens each, the step runs ``B (1 + k)``
    tokens instead of ``B``, so it costs ``S(B (1 + k)) / S(B)`` plain steps, ``S(T)`` the seconds of
    a step of ``T`` tokens (``step_seconds``: the runner's measured curve, :class:`StepTimes`),
    plus ``k d`` for a proposer that runs a forward per drafted token costing ``d`` plain steps
    (``draft_cost``: 0 for prompt lookup; a draft model's is measured by the runner as it goes).
    Without a curve, ``S(T) = W + T t`` (``W`` reading the weights once, ``t`` a token's compute):
    ``1 + k B r / (1 + B r)`` plain steps, ``r = t / W`` (``token_cost``). Measured curves are not
    lines: on a CPU a step of 4 tokens costs about what one of 1 does and beyond that each token
    adds about the same, so a line through both regions is wrong in each. Each request takes the
    k of most expected tokens per unit of cost; none unless that beats plain decoding by
    ``margin``.
    A large batch (compute bound) thus turns speculation off by itself; ``disable_by_batch_size``
    is a hard limit besides. Without ``adaptive`` every request drafts ``max_k``.

    A request's estimate starts from the acceptance of all requests so far (``overall``, weighing
    as two drafted tokens), so a good proposer drafts from a request's first step and a poor one
    does not. A request whose acceptance has fallen too low to draft probes with one token every
    ``probe_interval`` of its steps, so its estimate can recover when its text turns repetitive.
    The choice depends on the request's own history and the batch size only; the tokens do not
    depend on it at all (the rejection sampler keeps the target's distribution, and a seeded
    request's draws are fixed per output position).
    """

    def __init__(
        self,
        max_k: int,
        *,
        adaptive: bool = True,
        disable_by_batch_size: int | None = None,
        token_cost: float = 1 / 32,
        margin: float = 0.1,
        decay: float = 0.9,
        probe_interval: int = 8,
        draft_cost: float = 0.0,
        step_seconds: Callable[[int], float] | None = None,
    ) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.token_cost = token_cost
        self.margin = margin
        self.decay = decay
        self.probe_interval = probe_interval
        self.draft_cost = draft_cost
        self.step_seconds = step_seconds
        # every request's drafts, fading slowly; it starts hopeful (4 of 5): a user who turned
        # speculation on expects it, and a few drafts that do not pay are soon seen and stopped
        self.overall = Acceptance(drafted=5.0, accepted=4.0)

    def new_acceptance(self) -> Acceptance:
        """A new request's starting estimate: the overall rate, as if from two drafted tokens."""
        return Acceptance(drafted=2.0, accepted=2.0 * self.overall.rate)

    def step_cost(self, k: int, batch_size: int) -> float:
        """A step in which each of ``batch_size`` requests drafts ``k`` tokens, in plain steps."""
        if self.step_seconds is not None:
            plain = self.step_seconds(batch_size)
            if plain > 0:
                return self.step_seconds(batch_size * (1 + k)) / plain + k * self.draft_cost
        br = batch_size * self.token_cost
        return 1.0 + k * br / (1.0 + br) + k * self.draft_cost

    def choose_k(
        self, acc: Acceptance, batch_size: int, limit: int | None = None, catch_up: float = 0.0
    ) -> int:
        """Tokens to draft for a request with acceptance ``acc`` in a decode batch of
        ``batch_size`` requests; at most ``limit`` (what the request can still use). ``catch_up``:
        a one-time cost in plain steps before the proposer can draft for it (a draft model
        reading what the target accepted while it did not draft), spread over the steps of the
        request's next ``min(limit, CATCH_UP_HORIZON)`` tokens at the expected tokens per step."""
        cap = self.max_k if limit is None else max(0, min(self.max_k, limit))
        if cap == 0 or (self.disable_by_batch_size is not None and batch_size > self.disable_by_batch_size):
            return 0
        if not self.adaptive:
            return cap

        # a catch-up must repay itself within the next CATCH_UP_HORIZON tokens at most: further
        # out, the batch (and so whether the request drafts at all) is anyone's guess
        horizon = min(limit, CATCH_UP_HORIZON) if limit is not None else CATCH_UP_HORIZON

        def gain(rate: float, k: int) -> float:
            tokens = expected_tokens(rate, k)
            return tokens / (self.step_cost(k, batch_size) + catch_up * tokens / max(horizon, 1))

        best_k, best_gain = 0, 1.0 + self.margin
        for k in range(1, cap + 1):
            g = gain(acc.rate, k)
            if g > best_gain:
                best_k, best_gain = k, g
        if best_k == 0 and gain(1.0, 1) > 1.0 + self.margin:
            # the batch would allow it, the request's acceptance does not: probe now and then
            acc.steps_without_draft += 1
            if acc.steps_without_draft >= self.probe_interval:
                acc.steps_without_draft = 0
                return 1
            return 0
        acc.steps_without_draft = 0
        return best_k

    def record(self, acc: Acceptance, drafted: int, accepted: int) -> None:
        acc.update(drafted, accepted, self.decay)
        self.overall.update(drafted, accepted, 0.99, runs=False)


class StepTimes:
    """The runner's measured cost model, from the (tokens, seconds) of recent decode steps, so
    that the policy's costs are this machine's, not a guess (compute-bound CPUs pay much more per
    verified token than a GPU does):

    - ``seconds(T)``: the curve, each step's time kept in a bucket of its token count (buckets
      about 19% apart, recent steps weighing more: ``bucket_decay``), read between buckets by
      linear interpolation, made non-decreasing in T, and beyond the largest bucket extended by
      the slope of the last two;
    - ``line()``: a least-squares line ``seconds = W + T t`` through all of them (``decay`` each),
      for the policy's ``token_cost = t / W`` where there is no curve yet.
    """

    def __init__(self, decay: float = 0.98, min_steps: int = 8, bucket_decay: float = 0.9) -> None:
        self.decay = decay
        self.min_steps = min_steps
        self.bucket_decay = bucket_decay
        self.n = 0
        self._w = self._t = self._tt = self._y = self._ty = 0.0
        self._buckets: dict[int, list[float]] = {}  # key -> [weight, weight * tokens, weight * seconds]
        self._curve: tuple[list[float], list[float]] | None = None  # (tokens, seconds), built lazily

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.n += 1
        self._w = self._w * d + 1.0
        self._t = self._t * d + tokens
        self._tt = self._tt * d + tokens * tokens
        self._y = self._y * d + seconds
        self._ty = self._ty * d + tokens * seconds
        b = self._buckets.setdefault(round(4 * math.log2(max(tokens, 1))), [0.0, 0.0, 0.0])
        bd = self.bucket_decay
        b[0], b[1], b[2] = b[0] * bd + 1.0, b[1] * bd + tokens, b[2] * bd + seconds
        self._curve = None

    def seconds(self, tokens: int) -> float:
        """A step of ``tokens`` tokens, in seconds, from the curve; 0.0 until two token counts
        have been timed."""
        if self._curve is None:
            pts = sorted((t / w, y / w) for w, t, y in self._buckets.values())
            ts, ys, top = [], [], 0.0
            for t, y in pts:
                top = max(top, y)  # more tokens never take less time: noise would say otherwise
                ts.append(t)
                ys.append(top)
            self._curve = (ts, ys)
        ts, ys = self._curve
        if len(ts) < 2:
            return 0.0
        if tokens <= ts[0]:
            return ys[0]
        i = bisect.bisect_left(ts, tokens)
        if i == len(ts):  # past the largest: the last two buckets' slope
            i -= 1
        t0, t1, y0, y1 = ts[i - 1], ts[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (tokens - t0) / (t1 - t0)

    def line(self) -> tuple[float, float] | None:
        """``(W, t)``, or None until enough steps of different sizes give a line with both
        positive."""
        if self.n < self.min_steps:
            return None
        mean_t = self._t / self._w
        var = self._tt / self._w - mean_t * mean_t
        if var < 1.0:  # (nearly) one step size so far: no slope to fit
            return None
        slope = (self._ty / self._w - mean_t * self._y / self._w) / var
        intercept = self._y / self._w - slope * mean_t
        if slope <= 0 or intercept <= 0:
            return None
        return intercept, slope

    def mean_seconds(self) -> float:
        return self._y / self._w if self._w else 0.0
