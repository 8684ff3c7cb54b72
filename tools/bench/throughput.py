"""Aggregate output tokens/s with N requests of 128 prompt + 128 output tokens submitted at
once, for several N; writes a PNG of throughput vs concurrency with --plot.

    uv run python tools/bench/throughput.py [--concurrency 1 8 32 64] [--dtype float32] [--json] [--plot F]
"""

from __future__ import annotations

import argparse
import json
import time

from common import machine, random_prompts
from tqdm import tqdm

from tessera.engine import LLM
from tessera.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", nargs="+", default=["auto"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--quantized-weights", default="packed", choices=["packed", "dequantize"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="PNG", help="write throughput vs concurrency here")
    args = p.parse_args()

    rows = []
    for dtype in args.dtype:
        llm = LLM(
            args.model,
            dtype=dtype,
            quantized_weights=args.quantized_weights,
            max_model_len=args.prompt_tokens + args.output_tokens + 16,
            kv_cache_memory=1 << 30,
            max_num_seqs=max(args.concurrency),
        )
        params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
        llm.generate(random_prompts(2, 32, llm.config.vocab_size, seed=99), params)  # warm-up
        for n in tqdm(args.concurrency, desc=f"throughput {dtype}", disable=None):
            prompts = random_prompts(n, args.prompt_tokens, llm.config.vocab_size, seed=n)
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - t
            produced = sum(len(o.token_ids) for o in outs)
            rows.append(
                {
                    "engine": f"tessera ({dtype}, {args.quantized_weights} weights)",
                    "concurrency": n,
                    "output_tok_s": produced / seconds,
                    "seconds": seconds,
                }
            )
        del llm
    if args.json:
        for r in rows:
            print(json.dumps({**r, "machine": machine()}))
    else:
        print(f"{'engine':22} {'concurrency':>11} {'output tok/s':>13}")
        for r in rows:
            print(f"{r['engine']:22} {r['concurrency']:11d} {r['output_tok_s']:13.1f}")
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        pts = [(r["concurrency"], r["output_tok_s"]) for r in rows if r["engine"] == engine]
        ax.plot(*zip(*pts, strict=True), marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s (aggregate)")
    ax.set_title("Throughput vs concurrency (128 prompt + 128 output tokens)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
