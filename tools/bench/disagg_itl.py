"""Short chats' inter-token latency with long prompts mixed in: one colocated server against a
disaggregated deployment (a prefill server, a decode server and `tessera router`), in one run.

Every engine is pinned to one core (`taskset`): the colocated server to core 0 (also with a small
prefill chunk, the usual colocated remedy), the prefill server to core 0 and the decode server to
core 1, so each role has a core as it would on its own machine. The router and this load generator
are not pinned. A fixed schedule of streamed short chats (greedy, ``ignore_eos``) with long
token-id prompts among them; the inter-token latency is measured at the client, between the
chunks of a stream that carry text.

    uv run python tools/bench/disagg_itl.py [--out docs/bench/disagg] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import machine

TOPICS = [
    "a lighthouse", "the moon", "a lost key", "autumn rain", "a robot cook", "an old map",
    "a quiet library", "the first snow", "a paper boat", "a city at night", "a tiny dragon",
    "a train journey",
]  # fmt: skip


@dataclass
class Stream:
    kind: str
    sent: float
    chunks: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], core: int | None, health: str, timeout: float = 180) -> subprocess.Popen:
    cmd = (["taskset", "-c", str(core)] if core is not None else []) + [sys.executable, "-m", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if core is not None:
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited: {proc.stderr.read()}")
        try:
            if httpx.get(health, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not become healthy")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def serve_args(port: int, a, extra: list[str]) -> list[str]:
    return [
        "tessera.engine.cli", "serve", a.model, "--port", str(port), "--max-model-len", str(a.max_model_len),
        "--kv-cache-memory", a.kv_cache_memory, *extra,
    ]  # fmt: skip


async def one(client: httpx.AsyncClient, url: str, kind: str, body: dict, at: float, t0: float) -> Stream:
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    s = Stream(kind, time.perf_counter())
    try:
        async with client.stream("POST", url + path, json=body | {"stream": True}) as r:
            if r.status_code != 200:
                s.error = f"{r.status_code}: {(await r.aread())[:200]!r}"
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    s.error = str(event["error"])
                    return s
                for c in event.get("choices", []):
                    if c.get("delta", {}).get("content") or c.get("text"):
                        s.chunks.append(time.perf_counter())
    except httpx.HTTPError as e:
        s.error = f"{type(e).__name__}: {e}"
    return s


def workload(a, vocab: int = 49152) -> list[tuple[float, str, dict]]:
    rng = random.Random(0)
    jobs = []
    for i in range(a.short):
        topic = TOPICS[i % len(TOPICS)]
        body = {
            "messages": [{"role": "user", "content": f"Tell me a short story about {topic} (#{i})."}],
            "max_tokens": a.short_tokens, "temperature": 0, "ignore_eos": True,
        }  # fmt: skip
        jobs.append((i * a.short_every, "short", body))
    for j in range(a.long):
        prompt = [rng.randrange(100, vocab) for _ in range(a.long_tokens)]
        body = {"prompt": prompt, "max_tokens": a.long_output, "temperature": 0, "ignore_eos": True}
        jobs.append((a.long_start + j * a.long_every, "long", body))
    return sorted(jobs, key=lambda j: j[0])


async def drive(url: str, jobs) -> list[Stream]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(client, url, k, b, at, t0) for at, k, b in jobs))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs)) - 1))] if xs else float("nan")


def summary(streams: list[Stream]) -> dict:
    short = [s for s in streams if s.kind == "short" and s.error is None]
    long = [s for s in streams if s.kind == "long" and s.error is None]
    itl = [x for s in short for x in s.itl]
    return {
        "errors": [s.error for s in streams if s.error],
        "short_itl_ms": {q: 1e3 * pct(itl, q) for q in (50, 90, 99)} | {"max": 1e3 * max(itl, default=0)},
        "short_ttft_ms": {q: 1e3 * pct([s.ttft for s in short], q) for q in (50, 99)},
        "long_ttft_ms": {50: 1e3 * pct([s.ttft for s in long], 50)},
        "short_itl_s": [round(x, 5) for x in itl],
    }


def run_config(name: str, a, jobs) -> dict:
    procs = []
    try:
        if name.startswith("colocated"):
            port = free_port()
            extra = ["--max-num-batched-tokens", str(a.chunk)] if name.endswith("chunked") else []
            procs.append(start(serve_args(port, a, extra), a.cores[0], f"http://127.0.0.1:{port}/health"))
            url = f"http://127.0.0.1:{port}"
        else:
            pp, cp, rp = free_port(), free_port(), free_port()
            prod = json.dumps({"kv_role": "kv_producer", "kv_connector": "TCPConnector"})
            cons = json.dumps({"kv_role": "kv_consumer", "kv_connector": "TCPConnector"})
            procs.append(start(serve_args(pp, a, ["--kv-transfer-config", prod]), a.cores[0],
                               f"http://127.0.0.1:{pp}/health"))  # fmt: skip
            procs.append(start(serve_args(cp, a, ["--kv-transfer-config", cons]), a.cores[1],
                               f"http://127.0.0.1:{cp}/health"))  # fmt: skip
            prefill, decode = f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{cp}"
            router = [
                "tessera.engine.cli",
                "router",
                "--port",
                str(rp),
                "--prefill",
                prefill,
                "--decode",
                decode,
            ]
            procs.append(start(router, None, f"http://127.0.0.1:{rp}/health"))
            url = f"http://127.0.0.1:{rp}"
        warm = [(0.0, "short", jobs[0][2]), (0.0, "long", next(b for _, k, b in jobs if k == "long"))]
        asyncio.run(drive(url, warm))
        t = time.perf_counter()
        out = summary(asyncio.run(drive(url, jobs)))
        out["seconds"] = time.perf_counter() - t
        return out
    finally:
        stop(procs)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        xs = sorted(1e3 * x for x in r["short_itl_s"])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{name} (p99 {r['short_itl_ms'][99]:.0f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("short chats' inter-token latency (ms, log)")
    ax.set_ylabel("share of gaps")
    ax.set_title("long prompts mixed into short chats, one core per engine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--short", type=int, default=24, help="short chats (default: %(default)s)")
    p.add_argument("--short-every", type=float, default=0.4, help="seconds between them")
    p.add_argument("--short-tokens", type=int, default=128, help="tokens each streams")
    p.add_argument("--long", type=int, default=4, help="long prompts mixed in")
    p.add_argument("--long-tokens", type=int, default=1536, help="their prompt's tokens")
    p.add_argument("--long-output", type=int, default=16)
    # off the chats' arrival grid: a long prompt lands while chats are mid-stream
    p.add_argument("--long-start", type=float, default=1.3)
    p.add_argument("--long-every", type=float, default=2.5)
    p.add_argument("--chunk", type=int, default=256, help="colocated-chunked's --max-num-batched-tokens")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-memory", default="128MiB")
    p.add_argument("--cores", default="0,1", help="the two cores engines are pinned to")
    p.add_argument("--configs", nargs="+", default=["colocated", "colocated-chunked", "disaggregated"])
    p.add_argument("--out", type=Path, default=None, help="folder for disagg_itl.json and disagg_itl.png")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    a.cores = [int(c) for c in a.cores.split(",")]
    jobs = workload(a)
    t = time.perf_counter()
    results = {name: run_config(name, a, jobs) for name in a.configs}
    wall = time.perf_counter() - t
    report = {"machine": machine(), "wall_s": wall, "args": {k: v for k, v in vars(a).items() if k != "out"}}
    report["results"] = results
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "disagg_itl.json").write_text(json.dumps(report, default=str) + "\n")
        plot(results, a.out / "disagg_itl.png")
    if a.json:
        print(json.dumps(report, default=str))
        return
    print(f"{machine()}; wall {wall:.0f} s")
    head = ("ITL p50", "p90", "p99", "max", "TTFT p50", "p99", "long TTFT")
    print(f"{'config':20}", *(f"{h:>9}" for h in head))
    for name, r in results.items():
        i, f = r["short_itl_ms"], r["short_ttft_ms"]
        row = (i[50], i[90], i[99], i["max"], f[50], f[99], r["long_ttft_ms"][50])
        print(f"{name:20}", *(f"{x:9.1f}" for x in row), f" errors: {len(r['errors'])}")


if __name__ == "__main__":
    main()
