"""How many tokens to draft for a request this step: from its own measured acceptance and from
what verification costs at the current batch size, none when speculation would not pay."""

from __future__ import annotations

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

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted

    def update(self, drafted: int, accepted: int, decay: float) -> None:
        if drafted:
            judged = accepted + (accepted < drafted)
            self.drafted = self.drafted * decay + judged
            self.accepted = self.accepted * decay + accepted


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a verification of ``k`` drafts yields when each is accepted with probability
    ``rate`` until the first rejection, counting the token sampled after them: 1 + a + ... + a^k."""
    return float(k + 1) if rate >= 1.0 else (1.0 - rate ** (k + 1)) / (1.0 - rate)


class AdaptivePolicy:
    """k for each request and step.

    Cost model: a step's time is ``W + T t`` for ``T`` tokens (``W`` reading the weights once, ``t``
    a token's compute), so with ``B`` decoding requests drafting ``k`` tokens each the step costs
    ``1 + k B r / (1 + B r)`` plain steps, ``r = t / W`` (``token_cost``), plus ``k d`` for a
    proposer that runs a forward per drafted token costing ``d`` plain steps (``draft_cost``: 0 for
    prompt lookup; a draft model's is measured by the runner as it goes). Each request takes the k
    of most expected tokens per unit of cost; none unless that beats plain decoding by ``margin``.
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
    ) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.token_cost = token_cost
        self.margin = margin
        self.decay = decay
        self.probe_interval = probe_interval
        self.draft_cost = draft_cost
        # every request's drafts, fading slowly; it starts hopeful (4 of 5): a user who turned
        # speculation on expects it, and a few drafts that do not pay are soon seen and stopped
        self.overall = Acceptance(drafted=5.0, accepted=4.0)

    def new_acceptance(self) -> Acceptance:
        """A new request's starting estimate: the overall rate, as if from two drafted tokens."""
        return Acceptance(drafted=2.0, accepted=2.0 * self.overall.rate)

    def step_cost(self, k: int, batch_size: int) -> float:
        br = batch_size * self.token_cost
        return 1.0 + k * br / (1.0 + br) + k * self.draft_cost

    def choose_k(self, acc: Acceptance, batch_size: int, limit: int | None = None) -> int:
        """Tokens to draft for a request with acceptance ``acc`` in a decode batch of
        ``batch_size`` requests; at most ``limit`` (what the request can still use)."""
        cap = self.max_k if limit is None else max(0, min(self.max_k, limit))
        if cap == 0 or (self.disable_by_batch_size is not None and batch_size > self.disable_by_batch_size):
            return 0
        if not self.adaptive:
            return cap
        best_k, best_gain = 0, 1.0 + self.margin
        for k in range(1, cap + 1):
            gain = expected_tokens(acc.rate, k) / self.step_cost(k, batch_size)
            if gain > best_gain:
                best_k, best_gain = k, gain
        if best_k == 0 and expected_tokens(1.0, 1) / self.step_cost(1, batch_size) > 1.0 + self.margin:
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
        self.overall.update(drafted, accepted, 0.99)


class StepTimes:
    """The runner's measured cost model: a least-squares line ``seconds = W + T t`` through the
    (tokens, seconds) of recent decode steps, older steps weighing less (``decay`` each), so that
    the policy's ``token_cost = t / W`` is this machine's, not a guess: compute-bound CPUs pay
    much more per verified token than a GPU does."""

    def __init__(self, decay: float = 0.98, min_steps: int = 8) -> None:
        self.decay = decay
        self.min_steps = min_steps
        self.n = 0
        self._w = self._t = self._tt = self._y = self._ty = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.n += 1
        self._w = self._w * d + 1.0
        self._t = self._t * d + tokens
        self._tt = self._tt * d + tokens * tokens
        self._y = self._y * d + seconds
        self._ty = self._ty * d + tokens * seconds

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
