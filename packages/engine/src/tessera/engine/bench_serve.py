"""``tessera bench serve``: time to first token, inter-token latency and throughput of a running
OpenAI-compatible server at several concurrencies (streaming completions, token-id prompts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

_SAMPLE_TEXT = (
    "The river rose in the spring, and the villagers carried their boats up the hill to wait for the water "
    "to fall. Children counted the days, traders argued over prices, and the old miller repaired his wheel "
    "with wood from the forest beyond the northern fields. 0123456789 (){}[] <> .,;:!? +-*/= @#$%&"
)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _one(client, url, headers, model, prompt, max_tokens):
    t0 = time.perf_counter()
    first = None
    stamps = []
    tokens = 0
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if first is None:
                    first = now
                stamps.append(now)
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return (first or time.perf_counter()) - t0, itl, tokens


async def _level(url, headers, model, concurrency, n_requests, prompt_tokens, output_tokens, pool, seed):
    import httpx

    rng = random.Random(seed)
    prompts = [[rng.choice(pool) for _ in range(prompt_tokens)] for _ in range(n_requests)]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

        async def run(p):
            async with sem:
                return await _one(client, url, headers, model, p, output_tokens)

        t = time.perf_counter()
        results = await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - t
    ttft = [r[0] for r in results]
    itl = [x for r in results for x in r[1]]
    produced = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "output_tok_s": produced / wall,
        "ttft_ms_p50": 1e3 * _pct(ttft, 50),
        "ttft_ms_p90": 1e3 * _pct(ttft, 90),
        "ttft_ms_p99": 1e3 * _pct(ttft, 99),
        "itl_ms_p50": 1e3 * _pct(itl, 50),
        "itl_ms_p90": 1e3 * _pct(itl, 90),
        "itl_ms_p99": 1e3 * _pct(itl, 99),
        "itl_ms_mean": 1e3 * (statistics.fmean(itl) if itl else float("nan")),
        "seconds": wall,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--requests-per-level", type=int, default=None, help="default: 2 x concurrency, at least 4"
    )
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true", help="one JSON object per concurrency level")


def run(ns: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    try:
        info = httpx.get(f"{ns.url}/v1/models", headers=headers, timeout=10).json()["data"][0]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise ValueError(f"no OpenAI-compatible server answers at {ns.url} ({e})") from e
    # prompt tokens are drawn from the ids of ordinary text, so any tokenizer's ids are valid
    tok = httpx.post(f"{ns.url}/tokenize", json={"prompt": _SAMPLE_TEXT}, headers=headers, timeout=10)
    pool = sorted(set(tok.json()["tokens"])) if tok.status_code == 200 else list(range(100, 1000))
    rows = []
    for c in ns.concurrency:
        n = ns.requests_per_level or max(4, 2 * c)
        print(
            f"bench serve: concurrency {c}, {n} requests of {ns.prompt_tokens}+{ns.output_tokens} tokens...",
            file=sys.stderr,
            flush=True,
        )
        rows.append(
            asyncio.run(
                _level(ns.url, headers, info["id"], c, n, ns.prompt_tokens, ns.output_tokens, pool, seed=c)
            )
        )
    if ns.json:
        for r in rows:
            print(json.dumps({**r, "model": info["id"], "url": ns.url}))
        return 0
    cols = [
        "concurrency",
        "output_tok_s",
        "ttft_ms_p50",
        "ttft_ms_p90",
        "ttft_ms_p99",
        "itl_ms_p50",
        "itl_ms_p90",
        "itl_ms_p99",
    ]
    print(" ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:12.1f}" if isinstance(r[c], float) else f"{r[c]:12d}" for c in cols))
    return 0
