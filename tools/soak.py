"""Soak: 32 concurrent clients for ten minutes against `tessera serve` — ordinary chat and
completion requests (streamed or not, random priorities and seeds), streams the client drops
half-way, requests whose client times out, and oversized or malformed requests. Passes when no
answer is a 5xx, the server's RSS stays flat after warm-up, and KV usage is back to 0 at the end.

    uv run python tools/soak.py [--duration 600] [--clients 32] [--plot docs/soak.png] [--json]

Without --url it starts the server itself (default model and dtype, priority scheduling) and
reads its RSS from /proc; with --url it drives a running server and reports no RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
from tqdm import tqdm

KEY = "soak"
HEADERS = {"Authorization": f"Bearer {KEY}"}
TOPICS = ["the sea", "a city at night", "bread", "prime numbers", "a lost key", "autumn", "robots", "tea"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "tessera.engine.cli", "serve", "--port", str(port), "--api-key", KEY]
    cmd += [
        "--scheduling-policy",
        "priority",
        "--max-model-len",
        "2048",
        "--kv-cache-memory",
        "256MiB",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stdout.read()}")
    proc.kill()
    raise SystemExit("the server did not become healthy in 180 s")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def gauge(metrics: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", metrics, re.M)
    return float(m.group(1)) if m else float("nan")


def chat_body(rng: random.Random, stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": f"Write about {rng.choice(TOPICS)}."}],
        "max_tokens": rng.randint(8, 96),
        "temperature": rng.choice([0, 0.7, 1.0]),
        "seed": rng.randrange(1 << 30),
        "priority": rng.randint(-5, 5),
        "n": rng.choice([1, 1, 1, 2]),
        "stream": stream,
    }


def oversized(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.randrange(6)
    if kind == 0:
        return "/v1/chat/completions", json.dumps({**chat_body(rng, False), "n": 10**6}).encode()
    if kind == 1:
        return "/v1/completions", json.dumps({"prompt": "x " * 1_000_000}).encode()
    if kind == 2:
        return "/v1/completions", b"{" * 40_000_000  # past the 32 MiB body limit
    if kind == 3:
        return "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}'
    if kind == 4:
        return "/v1/chat/completions", b'{"messages": "\xff\xfe"}'
    return "/v1/completions", json.dumps({"prompt": [1] * 4096, "max_tokens": 4}).encode()


class Soak:
    def __init__(self, url: str, duration: float, clients: int, seed: int) -> None:
        self.url, self.duration, self.clients = url, duration, clients
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.server_errors: list[str] = []

    def record(self, kind: str, status: int | str, detail: str = "") -> None:
        self.outcomes[f"{kind}:{status}"] += 1
        if isinstance(status, int) and status >= 500:
            self.server_errors.append(f"{kind} {status} {detail[:200]}")

    async def stream(self, c: httpx.AsyncClient, path: str, body: dict, drop_after: int | None) -> None:
        kind = "drop" if drop_after is not None else "stream"
        async with c.stream("POST", f"{self.url}{path}", json=body, headers=HEADERS) as r:
            if r.status_code != 200:
                await r.aread()
                self.record(kind, r.status_code, r.text)
                return
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"error"' in line[:20]:
                    self.record(kind, 500, line)
                    return
                n += 1
                if drop_after is not None and n >= drop_after:
                    self.record(kind, "dropped")
                    return
            self.record(kind, 200)

    async def one(self, c: httpx.AsyncClient, rng: random.Random) -> None:
        pick = rng.random()
        try:
            if pick < 0.30:
                r = await c.post(
                    f"{self.url}/v1/chat/completions", json=chat_body(rng, False), headers=HEADERS
                )
                self.record("chat", r.status_code, r.text)
            elif pick < 0.55:
                await self.stream(c, "/v1/chat/completions", chat_body(rng, True), None)
            elif pick < 0.65:
                body = {"prompt": f"Once upon a time, {rng.choice(TOPICS)}", "max_tokens": rng.randint(4, 64)}
                r = await c.post(f"{self.url}/v1/completions", json=body, headers=HEADERS)
                self.record("completion", r.status_code, r.text)
            elif pick < 0.78:
                body = {**chat_body(rng, True), "max_tokens": 200}
                await self.stream(c, "/v1/chat/completions", body, rng.randint(1, 12))
            elif pick < 0.88:
                body = {**chat_body(rng, False), "max_tokens": 200}
                try:
                    r = await c.post(
                        f"{self.url}/v1/chat/completions",
                        json=body,
                        headers=HEADERS,
                        timeout=rng.uniform(0.05, 1.5),
                    )
                    self.record("disconnect", r.status_code, r.text)
                except httpx.TimeoutException:
                    self.record("disconnect", "client-timeout")
            else:
                path, content = oversized(rng)
                try:
                    r = await c.post(
                        f"{self.url}{path}",
                        content=content,
                        headers={**HEADERS, "Content-Type": "application/json"},
                    )
                    self.record("oversized", r.status_code, r.text)
                except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
                    self.record("oversized", "closed-early")  # refused while still sending
        except httpx.TimeoutException:
            self.record("any", "client-timeout")

    async def client(self, i: int, end: float) -> None:
        rng = random.Random(self.rng.randrange(1 << 30))
        async with httpx.AsyncClient(timeout=120) as c:
            while time.monotonic() < end:
                await self.one(c, rng)


async def sample(url: str, pid: int | None, end: float, every: float, out: list, bar) -> None:
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as c:
        while time.monotonic() < end:
            m = (await c.get(f"{url}/metrics")).text
            row = {
                "t": round(time.monotonic() - t0, 1),
                "rss_mb": round(rss_mb(pid), 1) if pid else None,
                "kv_usage": gauge(m, "tessera_kv_cache_usage_ratio"),
                "running": gauge(m, "tessera_num_requests_running"),
                "waiting": gauge(m, "tessera_num_requests_waiting"),
            }
            out.append(row)
            bar.update(min(every, end - time.monotonic()) if bar.n < bar.total else 0)
            bar.set_postfix(rss=row["rss_mb"], kv=f"{row['kv_usage']:.2f}", run=int(row["running"]))
            await asyncio.sleep(every)


async def main_async(args, url: str, pid: int | None) -> dict:
    soak = Soak(url, args.duration, args.clients, args.seed)
    end = time.monotonic() + args.duration
    curve: list[dict] = []
    bar = tqdm(total=args.duration, desc="soak", unit="s", disable=None)
    await asyncio.gather(
        sample(url, pid, end, args.sample_every, curve, bar),
        *(soak.client(i, end) for i in range(args.clients)),
    )
    bar.close()
    # every request has ended on the client side: the server must come back to idle and empty
    async with httpx.AsyncClient(timeout=10) as c:
        for _ in range(100):
            m = (await c.get(f"{url}/metrics")).text
            if (
                gauge(m, "tessera_num_requests_running") == 0
                and gauge(m, "tessera_num_requests_waiting") == 0
            ):
                break
            await asyncio.sleep(0.2)
        kv_end = gauge(m, "tessera_kv_cache_usage_ratio")
        rejected_5xx = re.findall(r'tessera_rejected_requests_total\{status="5\d\d"\} ([0-9.]+)', m)
    warm = [r["rss_mb"] for r in curve if r["t"] >= args.warmup and r["rss_mb"] is not None]
    return {
        "duration_s": args.duration,
        "clients": args.clients,
        "outcomes": dict(sorted(soak.outcomes.items())),
        "server_errors": soak.server_errors[:20],
        "num_5xx": len(soak.server_errors),
        "server_5xx_counted": sum(float(x) for x in rejected_5xx) - soak.outcomes.get("oversized:503", 0),
        "kv_usage_at_end": kv_end,
        "rss_after_warmup_mb": [min(warm), max(warm)] if warm else None,
        "rss_growth_after_warmup_mb": round(warm[-1] - warm[0], 1) if warm else None,
        "curve": curve,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in result["curve"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [r["rss_mb"] for r in result["curve"]], label="server RSS (MB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax2 = ax.twinx()
    ax2.plot(t, [r["kv_usage"] for r in result["curve"]], color="tab:orange", alpha=0.6, label="KV usage")
    ax2.set_ylabel("KV usage (share of blocks)")
    ax2.set_ylim(0, 1)
    ax.set_title(f"soak: {result['clients']} clients, {result['duration_s']:.0f} s, {result['num_5xx']} 5xx")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=float, default=60, help="seconds before RSS counts as warm")
    p.add_argument("--sample-every", type=float, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--json", action="store_true", help="print the whole result, curve included")
    p.add_argument("server_args", nargs="*", help="extra `tessera serve` options (after --)")
    args = p.parse_args()
    proc = None
    if args.url is None:
        proc, url = start_server(args.server_args)
    else:
        url = args.url
    try:
        result = asyncio.run(main_async(args, url, proc.pid if proc else None))
    finally:
        if proc is not None:
            proc.terminate()
            log, _ = proc.communicate(timeout=60)
            result_log = log[-4000:] if "Traceback" in log else ""
    if proc is not None:
        result["server_tracebacks"] = result_log
    if args.plot:
        plot(result, args.plot)
    shown = result if args.json else {k: v for k, v in result.items() if k != "curve"}
    print(json.dumps(shown, indent=1))
    ok = result["num_5xx"] == 0 and result["kv_usage_at_end"] == 0 and not result.get("server_tracebacks")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
