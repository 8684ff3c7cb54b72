"""Choosing one EXL2 setting per linear under a bits budget (exllamav2's ``conversion/optimize.py``
step, solved differently).

Each linear ``i`` has measured options ``(bits, error)``; the choice minimises
``sum_i weight_i * error_i`` subject to ``sum_i bits_i <= budget``. exllamav2 anneals over
``sum err^norm`` with a random search; this is the knapsack solved by dynamic programming over
the budget cut into at most ``RESOLUTION`` units (each option's bits rounded up to whole units,
so every choice it finds fits), then what the rounding left unspent is given greedily to the
upgrades that remove the most weighted error per bit. With budgets under ``RESOLUTION`` bits the
units are single bits and the result is the exact optimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Option = tuple[int, float]  # (total bits, error)
RESOLUTION = 1 << 16  # budget units of the dynamic programme (memory: linears x RESOLUTION bytes)


def _cost(slots: Mapping[str, Sequence[Option]], pick: Mapping[str, int]) -> int:
    return sum(slots[n][k][0] for n, k in pick.items())


def _knapsack(slots, weights, budget: int) -> dict[str, int] | None:
    """The least weighted error with every option's bits rounded up to units of the budget;
    None where the rounding leaves no choice that fits."""
    unit = max(1, math.ceil(budget / RESOLUTION))
    cap = budget // unit
    best = np.zeros(cap + 1)  # best[c]: least error of the linears so far within c units
    choices = []
    for name, opts in slots.items():
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int8)
        for k, (bits, err) in enumerate(opts):
            c = -(-bits // unit)
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[: cap + 1 - c] + weights[name] * err
            better = cand < new
            new[better], arg[better] = cand[better], k
        best = new
        choices.append((name, arg))
    if not np.isfinite(best[cap]):
        return None
    pick, c = {}, cap
    for name, arg in reversed(choices):
        k = int(arg[c])
        pick[name] = k
        c -= -(-slots[name][k][0] // unit)
    return pick


def _fill(slots, weights, pick: dict[str, int], budget: int) -> dict[str, int]:
    """Spend what is left of ``budget`` on upgrades (to an option of more bits and less error),
    the most weighted error removed per added bit first, until none fits."""
    left = budget - _cost(slots, pick)
    while True:
        best, best_gain = None, 0.0
        for name, opts in slots.items():
            bits, err = opts[pick[name]]
            for k, (b, e) in enumerate(opts):
                if b > bits and e < err and b - bits <= left:
                    gain = weights[name] * (err - e) / (b - bits)
                    if gain > best_gain:
                        best, best_gain = (name, k), gain
        if best is None:
            return pick
        name, k = best
        left -= slots[name][k][0] - slots[name][pick[name]][0]
        pick[name] = k


def allocate(
    slots: Mapping[str, Sequence[Option]], weights: Mapping[str, float], budget: int
) -> dict[str, int]:
    """Per linear the index of its chosen option; a ValueError where even the smallest options
    exceed ``budget``. ``weights``: each linear's weight in the summed error (positive)."""
    if not slots:
        raise ValueError("no linears to allocate bits to")
    if any(not 0 < len(opts) <= 127 for opts in slots.values()) or any(weights[n] <= 0 for n in slots):
        raise ValueError("every linear needs 1 to 127 options and a positive weight")
    smallest = sum(min(b for b, _ in opts) for opts in slots.values())
    if smallest > budget:
        raise ValueError(f"the smallest options take {smallest} bits, over the budget of {budget}")
    pick = _knapsack(slots, weights, budget)
    if pick is None:  # a budget within rounding of the smallest options: start from those
        pick = {n: min(range(len(o)), key=lambda k, o=o: o[k]) for n, o in slots.items()}
    return _fill(slots, weights, pick, budget)
