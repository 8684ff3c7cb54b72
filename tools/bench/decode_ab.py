"""Decode speed of several checkpoints of one model, compared in one process, interleaved.

``tessera bench latency`` runs one model per process; on a shared 2-core VM two such processes
minutes apart differ by up to 20% for the same model, more than the gaps between quantization
formats this is meant to show. Here every model is loaded once, then each round decodes the same
greedy stream on each model in turn (the order rotating from round to round), and each model's
speed is reported against the first model's in the same round: the median of those paired ratios
is what drift between rounds cannot move.

    uv run python tools/bench/decode_ab.py smollm2-135m-instruct /tmp/smol-gptq /tmp/exl2/smol-4.0 \\
        --rounds 9 --output-tokens 128 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import machine, random_prompts


def decode_speed(llm, prompt: list[int], output_tokens: int) -> float:
    """Tokens per second after the first, greedy, EOS ignored (as ``tessera bench latency``)."""
    from tessera.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    llm.reset_prefix_cache()
    stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="the first is the reference of the ratios")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", help="also write the results there")
    args = p.parse_args()
    if len(args.models) < 2 or args.rounds < 1:
        raise SystemExit("decode_ab: give at least two models and one round")

    from tqdm import tqdm

    from tessera.engine import LLM

    llms = {}
    for m in tqdm(args.models, desc="loading", disable=None):
        llms[m] = LLM(m, dtype=args.dtype, max_model_len=1024, kv_cache_memory=256 << 20)
    vocab = min(llm.config.vocab_size for llm in llms.values())
    prompt = random_prompts(1, 16, vocab, seed=7)[0]
    for llm in llms.values():  # warm-up: first-call allocations, the C kernels' build
        decode_speed(llm, prompt, 8)

    speeds: dict[str, list[float]] = {m: [] for m in args.models}
    ratios: dict[str, list[float]] = {m: [] for m in args.models}
    n = len(args.models)
    with tqdm(total=args.rounds * n, desc="decoding", disable=None) as bar:
        for r in range(args.rounds):
            order = [args.models[(i + r) % n] for i in range(n)]
            this = {}
            for m in order:
                this[m] = decode_speed(llms[m], prompt, args.output_tokens)
                bar.update()
            for m in args.models:
                speeds[m].append(this[m])
                ratios[m].append(this[m] / this[args.models[0]])

    rows = [
        {
            "model": m,
            "decode_tok_s": statistics.median(speeds[m]),
            "min": min(speeds[m]),
            "max": max(speeds[m]),
            "ratio_to_first": statistics.median(ratios[m]),
        }
        for m in args.models
    ]
    print(f"# {machine()}; {args.rounds} rounds, {args.output_tokens} tokens, dtype {args.dtype}")
    print(f"{'model':60s} {'tok/s (median)':>15s} {'min':>7s} {'max':>7s} {'x first':>8s}")
    for row in rows:
        print(
            f"{row['model']:60s} {row['decode_tok_s']:15.1f} {row['min']:7.1f} {row['max']:7.1f} "
            f"{row['ratio_to_first']:8.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
