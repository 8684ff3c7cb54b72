"""The adaptive policy's two cost models against each other and plain decoding, n-gram on the
editing prompts, in one process and rotating order (the machine's noise moves all three alike):

    cd tools/bench && uv run python spec_policy_ab.py --concurrency 32 --rounds 7
    cd tools/bench && uv run python spec_policy_ab.py --concurrency 1 --rounds 5

"curve": the runner's measured curve of step seconds against tokens (the default); "line": the
same runner made to use only the least-squares line ``W + T t`` through those steps (the model
before 2026-12-04's third session). Prints each round's tokens/s and, per policy, the median of
its per-round ratios to plain, the acceptance and the share of steps that speculated.
"""

from __future__ import annotations

import argparse
import statistics

import spec_decode as sd

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=None, help="default: 256 at batch 1, else 128")
    a = p.parse_args()
    max_tokens = a.max_tokens or (256 if a.concurrency == 1 else 128)
    arms = {
        "plain": sd.TesseraArm(a.model, None, sd.EDIT, max_tokens, a.concurrency),
        "curve": sd.TesseraArm(a.model, SPEC, sd.EDIT, max_tokens, a.concurrency),
        "line": sd.TesseraArm(a.model, SPEC, sd.EDIT, max_tokens, a.concurrency),
    }
    runner = arms["line"].llm.engine.runner
    runner.step_times.seconds = lambda tokens: 0.0  # no curve: the runner falls back to the line
    runner.spec_policy.step_seconds = None
    curve = arms["curve"].llm.engine.runner.step_times
    print(
        "curve, ms at 1 2 3 4 5 8 16 32 tokens:",
        [round(curve.seconds(t) * 1e3, 1) for t in (1, 2, 3, 4, 5, 8, 16, 32)],
    )
    print("line, token_cost t / W:", round(runner.spec_policy.token_cost, 3))
    names = list(arms)
    ratios: dict[str, list[float]] = {"curve": [], "line": []}
    for i in range(a.rounds):
        order = names[i % 3 :] + names[: i % 3]
        speeds = {n: arms[n].run() for n in order}
        for n in ratios:
            ratios[n].append(speeds[n] / speeds["plain"])
        print(f"round {i}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in speeds.items()), flush=True)
    for n, r in ratios.items():
        row = arms[n].row()
        print(
            f"{n}: x plain {statistics.median(r):.3f} (rounds {' '.join(f'{x:.2f}' for x in r)}), "
            f"acceptance {row['acceptance_rate']:.1%}, steps speculating {row['spec_step_share']:.1%}"
        )


if __name__ == "__main__":
    main()
