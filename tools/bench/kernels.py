"""The CPU kernels (Numba, and C where the CPU has AVX512-BF16) vs the torch reference of their
ops, on the default model's shapes (9 query heads, 3 KV heads, head size 64, blocks of 16).

    uv run python tools/bench/kernels.py [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from tessera.kernels import reference
from tessera.kernels_cpu import attention as cpu_attention
from tessera.kernels_cpu import elementwise, native, paged_attention, reshape_and_cache

HQ, HK, D, BS = 9, 3, 64, 16


def batch(cases, kv_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_blocks = sum(-(-t // BS) for t, _ in cases) + 1
    free = list(range(n_blocks))
    rng.shuffle(free)
    cache = torch.zeros(2, n_blocks, BS, HK, D, dtype=kv_dtype)
    scales = torch.ones(2, n_blocks, BS, HK) if kv_dtype in (torch.int8, torch.float8_e4m3fn) else None
    tables, qs = [], []
    for total, new in cases:
        table = [free.pop() for _ in range(-(-total // BS))]
        tables.append(table)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(total)])
        reference.reshape_and_cache(
            torch.randn(total, HK, D), torch.randn(total, HK, D), cache, slots, scales
        )
        qs.append(
            torch.randn(new, HQ, D, dtype=torch.bfloat16 if kv_dtype == torch.bfloat16 else torch.float32)
        )
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor(
        [0] + [sum(n for _, n in cases[: i + 1]) for i in range(len(cases))], dtype=torch.int32
    )
    return torch.cat(qs), cache, qsl, torch.tensor([t for t, _ in cases], dtype=torch.int32), bt, scales


def timeit(fn, *args, repeat=5) -> float:
    """Best of ``repeat`` calls after a warm-up call (which compiles)."""
    fn(*args)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def packed_linear_rows() -> list[dict]:
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from tessera.formats import QuantizedTensor
    from tessera.kernels_cpu import packed

    rng = np.random.default_rng(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30
    quantized = []
    for n, k in shapes:
        raw = quantize(rng.standard_normal((n, k), dtype=np.float32), GGMLQuantizationType.Q4_1)
        quantized.append(QuantizedTensor("Q4_1", torch.from_numpy(raw.reshape(n, -1).view(np.uint8)), (n, k)))
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        weights = [(packed.prepare_linear_weight(q, dtype), q.dequantize(dtype)) for q in quantized]
        # bf16: int8 products (up to prefill sizes, against torch's bf16 GEMM); fp32: FMAs
        for m in (1, 8, 32, 128, 512, 2048) if dtype == torch.bfloat16 else (1, 8, 32, 128):
            xs = {k: torch.randn(m, k, dtype=dtype) for k in (576, 1536)}

            def run(use_packed, weights=weights, xs=xs):
                for pw, dw in weights:
                    x = xs[dw.shape[1]]
                    packed.linear(x, pw) if use_packed else torch.nn.functional.linear(x, dw)

            t_ref, t_cpu = timeit(run, False, repeat=3), timeit(run, True, repeat=3)
            rows.append(
                {
                    "op": "linear",
                    "workload": f"{m} tokens x 120 Q4_1 weights, {str(dtype)[6:]}",
                    "reference_ms": t_ref * 1e3,
                    "cpu_ms": t_cpu * 1e3,
                    "speedup": t_ref / t_cpu,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    workloads = {
        "decode 1 seq x 512 ctx": [(512, 1)],
        "decode 32 seqs x 256 ctx": [(256, 1)] * 32,
        "decode 64 seqs x 256 ctx": [(256, 1)] * 64,
        "decode 64 seqs x 256 ctx, int8 KV": ([(256, 1)] * 64, torch.int8),
        "decode 64 seqs x 256 ctx, fp8 KV": ([(256, 1)] * 64, torch.float8_e4m3fn),
        "prefill 16 tokens": [(16, 16)],
        "prefill 512 tokens": [(512, 512)],
        "prefill 1024 tokens": [(1024, 1024)],
        "mixed: 1 x 512 prefill + 32 decodes": [(512, 512)] + [(256, 1)] * 32,
        "bf16 decode 32 seqs x 256 ctx": ([(256, 1)] * 32, torch.bfloat16),
        "bf16 decode 64 seqs x 1024 ctx": ([(1024, 1)] * 64, torch.bfloat16),
        "bf16 prefill 1056 tokens": ([(1056, 1056)], torch.bfloat16),
        "bf16 8 x 32 new tokens on 1,056": ([(1056, 32)] * 8, torch.bfloat16),
        "bf16 mixed: 1 x 512 prefill + 32 decodes": ([(512, 512)] + [(256, 1)] * 32, torch.bfloat16),
    }
    rows = []
    for name, spec in workloads.items():
        cases, kv_dtype = spec if isinstance(spec, tuple) else (spec, torch.float32)
        q, cache, qsl, lens, bt, scales = batch(cases, kv_dtype)
        t_ref = timeit(reference.paged_attention, q, cache, qsl, lens, bt, 0.125, None, scales)
        t_cpu = timeit(paged_attention, q, cache, qsl, lens, bt, 0.125, None, scales)
        rows.append(
            {
                "op": "paged_attention",
                "workload": name,
                "reference_ms": t_ref * 1e3,
                "cpu_ms": t_cpu * 1e3,
                "speedup": t_ref / t_cpu,
            }
        )
    # the C kernel against the path it replaces (SDPA over gathered blocks), bf16 long runs
    if native.library() is not None:
        for name, cases in [
            ("prefill 1056 tokens", [(1056, 1056)]),
            ("8 x 32 new on 1,056", [(1056, 32)] * 8),
        ]:
            q, cache, qsl, lens, bt, _ = batch(cases, torch.bfloat16)
            t_c = timeit(paged_attention, q, cache, qsl, lens, bt, 0.125)
            saved = native.library
            try:
                native.library = lambda: None
                t_sdpa = timeit(paged_attention, q, cache, qsl, lens, bt, 0.125, None, None, False)
            finally:
                native.library = saved
            flops = sum(HQ * D * 4 * (new * (tot - new) + new * new / 2) for tot, new in cases)
            rows.append(
                {
                    "op": "c_vs_sdpa",
                    "workload": f"bf16 {name}",
                    "sdpa_ms": t_sdpa * 1e3,
                    "c_ms": t_c * 1e3,
                    "c_gflop_s": flops / t_c / 1e9,
                }
            )
        x = torch.randn(2048, 576, dtype=torch.bfloat16)
        r, w = torch.randn_like(x), torch.randn(576, dtype=torch.bfloat16)
        qk = torch.randn(2048, (HQ + HK) * D, dtype=torch.bfloat16)
        ang = torch.rand(2048, D // 2)
        gu = torch.randn(2048, 2 * 1536, dtype=torch.bfloat16)
        for op, args_ in [
            ("fused_add_rms_norm", (x, r, w, 1e-5)),
            ("rotary_embedding", (qk[:, : HQ * D], qk[:, HQ * D :], ang.cos(), ang.sin(), D)),
            ("silu_and_mul", (gu,)),
        ]:
            t_ref = timeit(getattr(reference, op), *args_)
            t_cpu = timeit(getattr(elementwise, op), *args_)
            rows.append(
                {
                    "op": op,
                    "workload": "2048 tokens, bf16",
                    "reference_ms": t_ref * 1e3,
                    "cpu_ms": t_cpu * 1e3,
                    "speedup": t_ref / t_cpu,
                }
            )
    # packed GGUF weights: every projection of the default model's 30 layers (Q4_1, too big for
    # the caches together) multiplied by M tokens, against torch's GEMM on weights dequantized
    # beforehand (so the reference does not even pay for dequantizing)
    if native.library() is not None:
        rows.extend(packed_linear_rows())
    # where the SDPA path takes over: time each path alone on one sequence of n new tokens
    for n in (8, 16, 24, 32, 64):
        q, cache, qsl, lens, bt, scales = batch([(n + 256, n)])
        saved = cpu_attention.PREFILL_THRESHOLD
        try:
            cpu_attention.PREFILL_THRESHOLD = 10**9
            t_numba = timeit(paged_attention, q, cache, qsl, lens, bt, 0.125)
            cpu_attention.PREFILL_THRESHOLD = 0
            t_sdpa = timeit(paged_attention, q, cache, qsl, lens, bt, 0.125, None, None, False)
        finally:
            cpu_attention.PREFILL_THRESHOLD = saved
        rows.append(
            {
                "op": "crossover",
                "workload": f"{n} new tokens on 256 cached",
                "numba_ms": t_numba * 1e3,
                "sdpa_ms": t_sdpa * 1e3,
            }
        )
    for n, kv_dtype in [(64, torch.float32), (64, torch.int8), (1024, torch.float32), (1024, torch.int8)]:
        key, value = torch.randn(n, HK, D), torch.randn(n, HK, D)
        cache = torch.zeros(2, 128, BS, HK, D, dtype=kv_dtype)
        scales = torch.zeros(2, 128, BS, HK)
        slots = torch.randperm(128 * BS)[:n]
        t_ref = timeit(reference.reshape_and_cache, key, value, cache, slots, scales)
        t_cpu = timeit(reshape_and_cache, key, value, cache, slots, scales)
        rows.append(
            {
                "op": "reshape_and_cache",
                "workload": f"{n} tokens, {str(kv_dtype)[6:]}",
                "reference_ms": t_ref * 1e3,
                "cpu_ms": t_cpu * 1e3,
                "speedup": t_ref / t_cpu,
            }
        )
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'op':18} {'workload':40} {'reference ms':>13} {'cpu ms':>9} {'speedup':>8}")
    for r in rows:
        if r["op"] == "crossover":
            print(f"{'  numba vs sdpa':18} {r['workload']:40} {r['sdpa_ms']:13.3f} {r['numba_ms']:9.3f}")
        elif r["op"] == "c_vs_sdpa":
            print(
                f"{'  C vs sdpa':18} {r['workload']:40} {r['sdpa_ms']:13.3f} {r['c_ms']:9.3f} "
                f"{r['sdpa_ms'] / r['c_ms']:7.1f}x  ({r['c_gflop_s']:.0f} GFLOP/s)"
            )
        else:
            print(
                f"{r['op']:18} {r['workload']:40} {r['reference_ms']:13.3f} {r['cpu_ms']:9.3f} "
                f"{r['speedup']:7.1f}x"
            )


if __name__ == "__main__":
    main()
