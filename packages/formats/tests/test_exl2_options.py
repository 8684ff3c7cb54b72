"""EXL2 candidate settings against exllamav2's ``QParams`` arithmetic (transcribed here from
``conversion/qparams.py`` and ``adaptivegptq.py`` @ da07fac), and the bit allocation against an
exhaustive search."""

import itertools
import math
import random

import pytest

from tessera.formats.quantize.exl2_allocate import allocate
from tessera.formats.quantize.exl2_options import CANDIDATES, HEAD_OPTIONS, EXL2Option


def reference_total_bits(group_size: dict, bits: list, bits_prop: list, rows: int, columns: int) -> int:
    """``QParams.total_bits`` (exllamav2's rows are the inputs, columns the outputs)."""
    groups, remaining, bits_groups = 0, rows, []
    for b, p in zip(bits, bits_prop, strict=True):
        g = math.ceil(min(rows * p, remaining) / group_size[b])
        groups += g
        remaining -= g * group_size[b]
        bits_groups.append(g)
    assert remaining <= 0
    total, tr = 0, rows
    for g, b in zip(bits_groups, bits, strict=True):
        r = min(group_size[b] * g, tr)
        tr -= r
        total += r * columns * b
    return total + groups * 16 + groups * 32 + groups * columns * 4 + rows * 32


def reference_groups(group_size: dict, bits: list, bits_prop: list, rows: int) -> list[tuple[int, int]]:
    """``AdaptiveGPTQ.configure`` + ``quantize``: (bits, rows) of each group in stored order."""
    counts, remaining = [], rows
    for b, p in zip(bits, bits_prop, strict=True):
        g = math.ceil(min(rows * p, remaining) / group_size[b])
        counts.append(g)
        remaining -= g * group_size[b]
    out, end = [], 0
    for b, g in zip(bits, counts, strict=True):
        for _ in range(g):
            a, end = end, min(end + group_size[b], rows)
            out.append((b, end - a))
    return out


SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (896, 4864), (49152, 576), (32, 64)]


@pytest.mark.parametrize("option", [*CANDIDATES, *HEAD_OPTIONS.values()], ids=lambda o: o.desc)
def test_layout_and_bits_are_exllamav2s(option):
    d = option.to_dict()
    gs = {int(b): g for b, g in d["group_size"].items()}
    for n_out, n_in in SHAPES:
        sizes, bits = option.layout(n_in)
        assert list(zip(bits, sizes, strict=True)) == reference_groups(gs, d["bits"], d["bits_prop"], n_in)
        assert option.total_bits(n_out, n_in) == reference_total_bits(
            gs, d["bits"], d["bits_prop"], n_in, n_out
        )
        assert EXL2Option.from_dict(d) == option


def test_the_candidates_span_2_to_8_bits_per_weight_in_rising_order():
    bpw = [o.bpw(576, 576) for o in CANDIDATES]
    assert 8 <= len(CANDIDATES) <= 12 and bpw == sorted(bpw)
    assert 2.1 < bpw[0] < 2.3 and 8.0 < bpw[-1] < 8.2


def test_settings_exllamav2_could_not_store_are_refused():
    with pytest.raises(ValueError, match="widest first"):
        EXL2Option.uniform(32, [4, 5], [0.5, 0.5])
    with pytest.raises(ValueError, match="multiples of 32"):
        EXL2Option.uniform(48, [4], [1.0])
    with pytest.raises(ValueError, match="summing to 1"):
        EXL2Option.uniform(32, [5, 4], [0.5, 0.4])
    with pytest.raises(ValueError, match="multiples of 32"):
        CANDIDATES[4].check(100, 576)


def _exhaustive(slots, weights, budget):
    names = list(slots)
    best = None
    for pick in itertools.product(*(range(len(slots[n])) for n in names)):
        bits = sum(slots[n][k][0] for n, k in zip(names, pick, strict=True))
        if bits <= budget:
            err = sum(weights[n] * slots[n][k][1] for n, k in zip(names, pick, strict=True))
            best = err if best is None else min(best, err)
    return best


def test_allocation_within_a_small_budget_is_the_exhaustive_optimum():
    rng = random.Random(0)
    for _ in range(30):
        slots, weights = {}, {}
        for i in range(5):
            size = rng.choice([1, 2, 4])
            hard = rng.uniform(0.5, 3)
            slots[f"l{i}"] = [(size * b, hard * 2.0**-b + rng.uniform(0, 1e-3)) for b in (2, 3, 4, 5, 6, 8)]
            weights[f"l{i}"] = float(size)
        lo = sum(s[0][0] for s in slots.values())
        hi = sum(s[-1][0] for s in slots.values())
        budget = rng.randint(lo, hi)
        pick = allocate(slots, weights, budget)
        spent = sum(slots[n][k][0] for n, k in pick.items())
        got = sum(weights[n] * slots[n][k][1] for n, k in pick.items())
        assert spent <= budget
        assert got == pytest.approx(_exhaustive(slots, weights, budget), rel=1e-12)


def test_allocation_gives_more_bits_where_the_error_is_larger():
    opts = lambda hard: [(b * 1000, hard * 4.0**-b) for b in (2, 3, 4, 5, 6, 8)]  # noqa: E731
    slots = {"easy": opts(1.0), "hard": opts(50.0)}
    pick = allocate(slots, {"easy": 1.0, "hard": 1.0}, 9000)
    assert slots["hard"][pick["hard"]][0] > slots["easy"][pick["easy"]][0]
    assert sum(slots[n][k][0] for n, k in pick.items()) == 9000


def test_a_large_budget_is_spent_to_within_one_unit_of_the_programme():
    rng = random.Random(1)
    slots = {f"l{i}": [(rng.randint(10**6, 10**7) * b, 2.0**-b) for b in (2, 4, 6, 8)] for i in range(40)}
    budget = sum(s[1][0] for s in slots.values()) + 12345
    pick = allocate(slots, {n: 1.0 for n in slots}, budget)
    spent = sum(slots[n][k][0] for n, k in pick.items())
    assert budget - 2 * math.ceil(budget / 65536) * 40 < spent <= budget


def test_a_budget_below_the_smallest_options_is_refused():
    with pytest.raises(ValueError, match="over the budget"):
        allocate({"a": [(100, 1.0), (200, 0.5)]}, {"a": 1.0}, 99)
