"""32 requests sharing a 1,024-token prefix with distinct 32-token suffixes, one output token
each, with the prefix cache on and off.

    uv run python tools/bench/prefix_cache.py [--dtype float32|bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from common import machine, random_prompts
from tqdm import tqdm

from tessera.engine import LLM
from tessera.sampling import SamplingParams


def run(llm: LLM, prompts: list[list[int]]) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.reset_prefix_cache()
    t = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto", help="compute dtype (default: the engine's own, %(default)s)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--quantized-weights", default="packed", choices=["packed", "dequantize"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    results = {}
    bar = tqdm(["on", "off"], desc="prefix cache", disable=None)
    for mode in bar:
        bar.set_postfix_str(f"cache {mode}: loading")
        llm = LLM(
            args.model,
            dtype=args.dtype,
            quantized_weights=args.quantized_weights,
            max_model_len=args.prefix + args.suffix + 16,
            kv_cache_memory=1 << 30,
            max_num_batched_tokens=2048,
            enable_prefix_caching=mode == "on",
        )
        vocab = llm.config.vocab_size
        (prefix,) = random_prompts(1, args.prefix, vocab, seed=1)
        suffixes = random_prompts(args.requests, args.suffix, vocab, seed=2)
        prompts = [prefix + s for s in suffixes]
        run(llm, random_prompts(2, 64, vocab, seed=3))  # warm-up: compiles kernels
        bar.set_postfix_str(f"cache {mode}: running")
        seconds = run(llm, prompts)
        stats = llm.stats()
        results[mode] = {"seconds": seconds, "prefix_hit_rate": stats.prefix_cache_hit_rate}
        del llm
    out = {
        "machine": machine(),
        "dtype": args.dtype,
        "quantized_weights": args.quantized_weights,
        "requests": args.requests,
        "prefix": args.prefix,
        "suffix": args.suffix,
        "cache_on_s": results["on"]["seconds"],
        "cache_off_s": results["off"]["seconds"],
        "hit_rate_on": results["on"]["prefix_hit_rate"],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.requests} requests x ({args.prefix} shared + {args.suffix}) tokens, 1 output token, "
            f"{args.dtype}"
        )
        print(f"  prefix cache on : {out['cache_on_s']:.2f} s (hit rate {out['hit_rate_on']:.1%})")
        print(f"  prefix cache off: {out['cache_off_s']:.2f} s")


if __name__ == "__main__":
    main()
