"""Seconds of one engine step against its number of tokens (a prompt of T random tokens, one
token out, prefix cache reset), median of ``--repeats``: the curve the adaptive speculation policy
prices drafts with.

    cd tools/bench && uv run python step_curve.py --model qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


def main() -> None:
    from tessera.engine import LLM
    from tessera.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    llm = LLM(a.model, max_model_len=1024)
    one = SamplingParams(temperature=0, max_tokens=1)
    rng = random.Random(0)
    times: dict[int, list[float]] = {}
    for _ in range(a.repeats):
        for t in SIZES:
            prompt = [rng.randrange(1000, 50000) for _ in range(t)]
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            llm.generate([prompt], one)
            times.setdefault(t, []).append(time.perf_counter() - t0)
    base = statistics.median(times[1])
    print(f"{'tokens':>6s} {'ms':>8s} {'x one':>6s}")
    for t in SIZES:
        m = statistics.median(times[t])
        print(f"{t:6d} {m * 1e3:8.1f} {m / base:6.2f}")


if __name__ == "__main__":
    main()
