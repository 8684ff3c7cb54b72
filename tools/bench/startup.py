"""Time from process start to the first generated token, on a first start (empty Numba and C
kernel caches) and on a second start (caches filled by the first).

    uv run python tools/bench/startup.py [--model M] [--dtype auto] [--json]

Each start is a fresh `tessera generate "Hello" --max-tokens 1` process; the time is measured
around the whole process, so it includes interpreter start-up, imports, loading the weights,
building or loading the kernels, the one-token generation and exit. Python's bytecode cache is
on, as by default (the first start also writes it, if the environment had none).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import machine


def start(env: dict, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "tessera.engine.cli", "generate", "Hello", "--max-tokens", "1", "--json"]
    cmd += [
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--kv-cache-memory",
        "64MiB",
        "--max-model-len",
        "256",
    ]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"startup: tessera generate failed:\n{r.stderr[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TESSERA_CACHE_DIR=cache, NUMBA_CACHE_DIR=os.path.join(cache, "numba"))
        # as Python runs by default: caching bytecode (some sandboxes set this variable; a
        # fresh virtual environment then compiles every module's source at every start)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        first = start(env, args)
        second = start(env, args)
    row = {"first_start_s": first, "second_start_s": second, "model": args.model, "dtype": args.dtype}
    row["machine"] = machine()
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"first start {first:.2f} s, second start {second:.2f} s (process start to first token and exit)"
        )


if __name__ == "__main__":
    main()
