"""Where a decode step's time goes on a GPU (a stage of tools/gpu_check.py, run in a child process).

1. The few-token quantized linear alone, at Llama-3-8B's shapes (q/o, k/v, gate/up, down in Q4_K,
   the LM head in Q8_0), for each kernel and tile: the tensor-core kernel (``dot``: tokens padded
   to 16), the one-program-per-token kernel that takes a packed word at a time (``words``) and
   csrc/qgemv.cu's int8 dot products (``native``: with the activations' quantization;
   ``native_gemv``: without it),
   beside cuBLAS on the same matrix in bf16 (2 bytes a weight: the bar a 4-bit kernel must beat
   by reading fewer bytes), and for several tokens the dequantize + cuBLAS path. Random planes
   (speed does not depend on the values), several copies of each matrix in rotation so that no
   launch finds its weights in the 60 MB L2, launches captured in a CUDA graph so that the time
   is the kernels' and not Python's. Reported: microseconds per launch and the packed bytes over
   that time in TB/s.
2. The whole model (a random Llama-3-8B-shaped GGUF): single-stream decode with each candidate
   kernel, and for the first a profile of a few decode steps (the GPU kernels by total time, the
   step's wall time against its graph replay and LM head), so the gap between the weights' bytes
   over HBM bandwidth and the measured step has names.
"""

from __future__ import annotations

import json
import statistics
import time

# (name, out features, in features, scheme) of one Llama-3-8B layer and its head
SHAPES = [
    ("q_o", 4096, 4096, "Q4_K"),
    ("k_v", 1024, 4096, "Q4_K"),
    ("gate_up", 14336, 4096, "Q4_K"),
    ("down", 4096, 14336, "Q4_K"),
    ("head", 128256, 4096, "Q8_0"),
]
# ("dot", BLOCK_N, BLOCK_K, warps, stages) / ("words", BLOCK_N, BLOCK_W, warps, stages, FAST_CVT):
# the measured best first (2026-12-04: 8 x 128, 4 warps, 3 stages; 4 x 128 and 4 x 256 near it;
# 8 x 64, 16 x 64, 16 x 128 x 8 warps, 32 x 32 far slower), each also with the conversion trick
DOT = [(16, 128, 4, 3), (16, 256, 4, 3)]
WORDS = [(8, 128, 4, 3, 0), (8, 128, 4, 3, 1), (4, 128, 4, 3, 1)]
# how often each shape runs per token (q and o, k and v, gate and up, down; the head once per model)
PER_TOKEN = {"q_o": 2, "k_v": 2, "gate_up": 2, "down": 1, "head": 1 / 32}
L2_DEFEAT_BYTES = 256 << 20


def _planes(scheme: str, n: int, k: int, device):
    import torch

    from tessera.kernels_cuda.gguf_layout import FORMS, Planes
    from tessera.kernels_cuda.quant_linear import PackedGPUWeight

    f = FORMS[scheme]

    def words(cols):
        return torch.randint(-(2**31), 2**31 - 1, (n, cols), dtype=torch.int32, device=device)

    planes = Planes(
        lo=words(k // 8),
        hi=words(k * f.hi_bits // 32) if f.hi_bits else None,
        d=(torch.rand(n, k // f.group, device=device) * 1e-3).half(),
        m=(-torch.rand(n, k // 32, device=device) * 1e-3).half() if f.has_m else None,
    )
    return PackedGPUWeight(scheme, planes, (n, k))


def _graph_time(launch, copies: int, reps: int = 5) -> float:
    """Seconds per launch: ``launch(i)`` for every copy i, ``reps`` times, in one CUDA graph,
    replayed 7 times (median)."""
    import torch

    for i in range(copies):  # compile and warm up outside the capture
        launch(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for i in range(copies):
                launch(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / (reps * copies))
    return statistics.median(times)


def _launch_dot(ql, x, out, w, tile):
    import triton

    bn, bk, warps, stages = tile
    (m, k), n = x.shape, w.shape[0]
    planes, strides = w._args()
    ql._qgemv_kernel[(triton.cdiv(n, bn), triton.cdiv(m, 16))](
        x, *planes, out, out, m, n, k, *strides, x.stride(0), out.stride(0),
        HAS_BIAS=False, IEEE=False, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages, **w._constexprs(),
    )  # fmt: skip


def _launch_words(ql, x, out, w, tile):
    import triton

    bn, bw, warps, stages, fast = tile
    (m, k), n = x.shape, w.shape[0]
    planes, strides = w._args()
    ql._qgemv_words_kernel[(triton.cdiv(n, bn), m)](
        x, *planes, out, out, m, n, k, *strides, x.stride(0), out.stride(0),
        HAS_BIAS=False, BLOCK_N=bn, BLOCK_W=bw, FAST_CVT=bool(fast), num_warps=warps, num_stages=stages,
        **w._constexprs(),
    )  # fmt: skip


def _launch_native(ql, x, out, w, tile):
    """csrc/qgemv.cu as ``linear`` runs it: the activations quantized, then the GEMV."""
    ql._native_gemv(ql._quantize_x(x), w, None, out)


def _launch_native_gemv(ql, q, out, w, tile):
    """csrc/qgemv.cu's GEMV alone, on activations quantized once (a row stack's later parts)."""
    ql._native_gemv(q, w, None, out)


def kernels(device: str = "cuda", shapes=SHAPES, dot=DOT, words=WORDS, tokens=(1, 2, 4, 8)) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from tessera.kernels_cuda import quant_linear as ql

    rows = []
    for name, n, k, scheme in shapes:
        w0 = _planes(scheme, n, k, device)
        copies = max(2, -(-L2_DEFEAT_BYTES // w0.nbytes))
        ws = [w0] + [_planes(scheme, n, k, device) for _ in range(copies - 1)]
        for m in tokens:
            if m > 1 and name != "gate_up":  # several tokens: one shape is enough
                continue
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            runs = [("dot", t, _launch_dot, x) for t in (dot if m == 1 else dot[:1])]
            runs += [("words", t, _launch_words, x) for t in (words if m == 1 else words[:1])]
            if m <= ql.NATIVE_MAX_TOKENS and ql._native_takes(x, [w0]):
                ql.GEMV_KERNEL = "native"
                runs += [("native", None, _launch_native, x), ("native_gemv", None, _launch_native_gemv,
                         ql._quantize_x(x))]  # fmt: skip
            for kind, tile, launch, xin in runs:
                call = lambda i, t=tile, f=launch, x=xin, o=out, w=ws: f(ql, x, o, w[i], t)  # noqa: E731
                seconds = _graph_time(call, copies)
                rows.append(_row(name, n, k, scheme, m, kind, tile and list(tile), seconds, w0.nbytes))
            if m > 1:  # what more tokens take: dequantize into a buffer, then cuBLAS
                call = lambda i, x=x, w=ws: ql._many_tokens(x, w[i], None, torch.bfloat16)  # noqa: E731
                rows.append(
                    _row(name, n, k, scheme, m, "dequant_cublas", None, _graph_time(call, copies), w0.nbytes)
                )
            if name != "head" and m == 1:  # cuBLAS on the bf16 matrix: 2 bytes a weight
                reps = max(2, -(-L2_DEFEAT_BYTES // (2 * n * k)))
                dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(reps)]
                seconds = _graph_time(lambda i, d=dense, x=x: F.linear(x, d[i]), reps)
                rows.append(_row(name, n, k, scheme, m, "cublas_bf16", None, seconds, 2 * n * k))
        ws = w0 = None
        torch.cuda.empty_cache()
    return rows


def _row(name, n, k, scheme, m, kind, tile, seconds, nbytes) -> dict:
    return {
        "shape": name, "n": n, "k": k, "scheme": scheme, "tokens": m, "kernel": kind, "tile": tile,
        "us": round(seconds * 1e6, 2), "tb_s": round(nbytes / seconds / 1e12, 3),
    }  # fmt: skip


def best_words(rows: list[dict]) -> str:
    """The words tile with the least time per token (each shape weighted by how often it runs)."""
    totals: dict[tuple, float] = {}
    for r in rows:
        if r["kernel"] == "words" and r["tokens"] == 1:
            key = tuple(r["tile"])
            totals[key] = totals.get(key, 0.0) + PER_TOKEN[r["shape"]] * r["us"]
    return "words," + ",".join(map(str, min(totals, key=totals.get)))


def _event_time(fn, reps: int = 20) -> float:
    """Seconds per call of ``fn`` (median of ``reps``, device events; for what a graph cannot
    capture, such as another graph's replay)."""
    import torch

    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_ms(llm, prompt, steps: int) -> float:
    """Median wall milliseconds of ``steps`` decode steps of one request (after a few untimed)."""
    from tessera.sampling import SamplingParams

    rid = llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    for _ in range(4):
        llm.step()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        llm.step()
        _sync()
        walls.append(time.perf_counter() - t)
    llm.abort(rid)
    return statistics.median(walls) * 1e3


def decode(path: str, spec: str, profile: bool, tokens: int = 64, device: str = "cuda") -> dict:
    """Single-stream decode of ``path`` with the few-token kernel ``spec``; with ``profile``, where
    a step's time goes."""
    import torch

    from tessera.engine import LLM
    from tessera.engine.bench_offline import random_prompts
    from tessera.kernels_cuda import quant_linear as ql
    from tessera.sampling import SamplingParams

    ql.set_gemv(spec)
    llm = LLM(
        path, dtype="bfloat16", device=device, max_model_len=512, kv_cache_memory=1 << 30, max_num_seqs=8
    )
    vocab = llm.config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    (prompt,) = random_prompts(1, 16, vocab, seed=1)
    llm.generate([prompt], SamplingParams(max_tokens=4))  # warm-up
    stamps = [time.perf_counter() for _ in llm.stream(prompt, params)]
    out = {"gemv": spec, "decode_tok_s": (tokens - 1) / (stamps[-1] - stamps[0])}
    runner = llm.engine.runner
    graphs = getattr(runner, "graphs", None)
    out["graphs"] = graphs.captured_sizes if graphs is not None else None
    if graphs is not None and graphs.graphs:
        out["graph_replay_ms"] = _event_time(lambda: graphs.replay(1)) * 1e3
        hidden = torch.randn(1, llm.config.hidden_size, device=device, dtype=torch.bfloat16)
        out["lm_head_ms"] = _event_time(lambda: llm.model.compute_logits(hidden)) * 1e3
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            out["profiled_step_ms"] = _step_ms(llm, prompt, 10)
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
        out["profile_table"] = table
        out["step_ms"] = _step_ms(llm, prompt, 20)  # without the profiler's own overhead
    return out


def main(dump: str, path: str) -> None:
    """(the child) both parts; the JSON to ``dump`` after each, so a time limit keeps what ran."""
    from pathlib import Path

    result: dict = {}

    def save():
        Path(dump).write_text(json.dumps(result))

    rows = kernels()
    result["kernels"] = rows
    save()
    words = best_words(rows)
    result["best_words"] = words
    result["decode"] = []
    from tessera.kernels_cuda import native

    built = native.library() is not None
    specs = [("native", True), (words, False)] if built else [(words, True), ("dot", False)]
    for spec, prof in specs:
        result["decode"].append(decode(path, spec, prof))
        save()
