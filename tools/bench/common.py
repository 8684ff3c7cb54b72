"""Shared pieces of the benchmarks: building an engine, distinct random prompts, machine info."""

from __future__ import annotations

import os
import platform
import random


def machine() -> str:
    import torch  # here, so that a peer's process (llama.cpp) does not load torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def random_prompts(n: int, length: int, vocab: int, seed: int = 0, avoid: int = 100) -> list[list[int]]:
    """Token-id prompts that share no prefix (ids below ``avoid`` skip special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(avoid, vocab) for _ in range(length)] for _ in range(n)]
