"""Read bandwidth of this machine's memory, as the ceiling for memory-bound decode.

    uv run python tools/bench/membw.py [--mb 512] [--runs 10]

Sums a buffer far larger than the last-level cache with torch on all its threads (a plain
streaming read) and prints the median and best GB/s. Single-stream decode of a memory-bound
model reads every active weight once per token, so tokens/s cannot exceed this over the bytes
per token (BENCHMARKS.md, "MoE against llama.cpp").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args()
    x = torch.ones(a.mb * (1 << 20) // 4, dtype=torch.float32)
    x.sum()  # pages touched, threads up
    rates = []
    for _ in range(a.runs):
        t = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    out = {"threads": torch.get_num_threads(), "mb": a.mb, "median_gb_s": statistics.median(rates)}
    out["best_gb_s"] = max(rates)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
