"""The GPU backend's one device check (issue 12): everything a lent GPU is needed for, in one call.

On the device machine (its python3 has torch, triton, transformers; carry the other wheels, see
tools/device_wheels.sh), from the repository root:

    python3 tools/gpu_check.py --out $OUT [--budget-s 540] [--skip-suite] [--no-reference] \
        [--stages suite,probe,correctness,distributed,bench,bench-exl2,exllamav2,recommend,spec] \
        [--suite-paths kernels-cuda,...] \
        [--shapes llama3-8b,smollm2-135m] [--side-timeout S]

Here, on the CPU, the same flow on tiny shapes checks the script itself:

    uv run python tools/gpu_check.py --out /tmp/gpu_check --smoke

Stages (all by default; ``--stages`` picks some), each skipped with its reason once the time
budget is spent:
1. the machine: GPU, torch/triton versions, and the ceilings measured on it (device-to-device copy
   bandwidth, bf16 matrix rate on random data), beside the datasheet's 4.8 TB/s and 989 TFLOP/s;
2. the test suite with TESSERA_DEVICE=cuda (kernels-cuda's tests then run every kernel compiled,
   against its reference), over 8 xdist workers and then, alone, the tests marked gpu_exclusive,
   as JUnit XML plus a summary;
   probe (before the suite when both run): where a decode step's time goes
   (tools/bench/gpu_probe.py): each few-token quantized-linear kernel and tile at Llama-3-8B's
   shapes against cuBLAS in bf16, then whole-model decode with the best of each kernel and a
   torch.profiler table of a decode step (probe.txt); the stages after it run the kernel that
   decoded faster (TESSERA_CUDA_GEMV);
3. correctness: a random-weight small Llama's logits (a ragged, chunked batch) with the CUDA
   kernels in bf16 and with the torch reference in bf16, both against the reference in fp32: the
   kernels pass when their error is at most twice the reference's own bf16 error (bf16 rounding
   is the tolerance, whichever order the sums go in); greedy tokens equal up to near-ties;
4. speed, on random-weight GGUFs shaped like SmolLM2-135M and Llama-3-8B (Q4_K matrices, Q8_0
   embedding and output, tools/bench/make_random_gguf.py): single-stream decode tokens/s and the
   fraction of HBM bandwidth it reaches (bytes one decode token reads: the weights as the backend
   holds them, i.e. linears, LM head and one embedding row, plus the KV cache; over the time),
   prefill of a 2,048-token prompt and its fraction of the bf16 peak, aggregate output tokens/s
   at 64 and 256 concurrent requests of 512 + 128 tokens with their time to first token, and the
   same figures with TESSERA_KERNELS=reference (every op the torch reference) as a ratio;
5. bench-exl2: the same figures (kernels only, 64 concurrent) for a random EXL2 folder shaped
   like Llama-3-8B at about 4.0 bpw (tools/bench/make_random_exl2.py), with the time to write it
   and its stored bits per weight; EXL2 runs as GGUF containers, so the held bytes exceed the
   file's;
6. exllamav2: exllamav2 0.3.2 against tessera on a random EXL2 folder shaped like SmolLM2-135M,
   logits and each linear's dequantized weight (tools/exllamav2_check.py); where exllamav2 is
   not installed, has no GPU, or its extension does not build, the reason is recorded;
7. recommend (issue 13): ``tessera recommend --candidates given --verify`` on a random EXL2 folder
   shaped like Llama-3-8B (bench-exl2's, kept for it where that stage ran) at 8,192 tokens x
   batch 4: the predicted memory of the recommended configuration, the peak measured when it
   runs so in a fresh process (device memory outside torch plus torch's peak reservation), and
   their error, which passes within 10%.
8. distributed (issue 16; run after correctness): greedy tokens and single-stream decode of the
   in-process runner against one worker process on NCCL (TP=1: one chip can't show tensor
   parallelism), and a disaggregated pair on the one GPU (a KV producer and a consumer server and
   `tessera router` in front) answering token-id prompts as the producer alone does, with the
   consumer's prompt-token counter.
9. spec (issue 14): what a draft model's speculation costs on the GPU
   (tools/bench/spec_projection.py): random-weight GGUFs shaped like Qwen2.5-Coder-1.5B (target,
   Q4_K) and 0.5B (draft, Q4_0; made lean: 32,768-token head, re-quantized to q4_0 as on the CPU)
   with one synthetic tokenizer; a plain decode step against speculative steps at k = 1..8 (k
   fixed: the pair never agrees, so the adaptive policy would stop drafting), split into drafting
   and verifying, and the speedup those costs give at acceptances 0.7-0.9 (the real pair's on
   the CPU: about 0.87 a token). The real files cannot be carried (over the carry limit).
Writes gpu_check.json under --out after every stage (a run stopped at its limit keeps what it
measured), the logs beside it, and prints the JSON last.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HBM_TB_S = 4.8  # H200 datasheet
BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, datasheet
SRC_DIRS = [
    *sorted((ROOT / "packages").glob("*/src")),
    ROOT / "kernels-cpu" / "src",
    ROOT / "kernels-cuda" / "src",
]
ENTRY_POINTS = {  # what `uv sync` would install: the backends' entry points
    "tessera_kernels_cpu": "cpu = tessera.kernels_cpu:register_all",
    "tessera_kernels_cuda": "cuda = tessera.kernels_cuda:register_all",
}


def workspace_env(site: Path) -> dict:
    """An environment where python3 imports the workspace's packages from their sources and finds
    the kernel backends' entry points, without installing anything (the device machine has no
    registry and no build backend)."""
    site.mkdir(parents=True, exist_ok=True)
    for dist, ep in ENTRY_POINTS.items():
        info = site / f"{dist}-0.1.0.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1.0\n"
        )
        (info / "entry_points.txt").write_text(f"[tessera.kernels]\n{ep}\n")
    env = dict(os.environ)
    paths = [str(site), *map(str, SRC_DIRS), str(ROOT / "tools" / "bench")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


CHILD_LOG: Path | None = None  # where the children's output goes (--out/children.log)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def child_log(title: str, text: str) -> None:
    if CHILD_LOG is not None:
        with CHILD_LOG.open("a") as f:
            f.write(f"==== {time.strftime('%H:%M:%S')} {title}\n{text[-20000:]}\n")


# -- 1. the machine ---------------------------------------------------------------------------


def machine(device: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "device": device}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device != "cuda":
        return out
    p = torch.cuda.get_device_properties(0)
    out |= {"gpu": p.name, "sm": f"{p.major}{p.minor}", "sms": p.multi_processor_count}
    out["memory_gib"] = round(p.total_memory / 2**30, 1)
    n = 1 << 30  # 1 GiB each way: far beyond the L2
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    out["copy_tb_s"] = round(2 * n / _cuda_time(functools.partial(dst.copy_, src)) / 1e12, 2)  # read + write
    del src, dst
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    out["bf16_tflops"] = round(2 * 8192**3 / _cuda_time(lambda: x @ x) / 1e12, 1)
    return out


def _cuda_time(fn, warmup: int = 3, reps: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / reps


# -- 2. the suite -----------------------------------------------------------------------------


SUITE_PATHS = ("kernels-cuda", "packages", "kernels-cpu", "integration_tests")


def suite(out: Path, env: dict, timeout: float, device: str, paths: list[str], workers: int) -> dict:
    """The tests under ``paths`` with TESSERA_DEVICE=device: over ``workers`` xdist workers where
    xdist is installed (the kernels' compiles and the CPU-side work spread over the cores), then,
    alone on the GPU, the tests marked gpu_exclusive (they read its free memory)."""
    env = dict(env, TESSERA_DEVICE=device)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        passes = [
            [*base, f"--junitxml={out / 'suite.xml'}", "-n", str(workers), "-m", "not gpu_exclusive", *paths],
            [*base, "-m", "gpu_exclusive", *paths],
        ]
    else:
        passes = [[*base, f"--junitxml={out / 'suite.xml'}", *paths]]
    start = time.monotonic()
    texts, codes = [], []
    for cmd in passes:
        log(f"suite: {' '.join(cmd[3:])} (TESSERA_DEVICE={device}, {timeout:.0f} s at most in all)")
        text, code = _pytest(cmd, env, max(10.0, timeout - (time.monotonic() - start)))
        texts.append(text)
        codes.append(code)
    (out / "suite.log").write_text("\n".join(texts))
    tails = [([ln for ln in t.strip().splitlines() if ln.strip()][-1:] or [""])[0] for t in texts]
    code = next((c for c in codes if c not in (0, 5)), 0)  # 5: a pass that selected nothing
    return {"exit": code, "summary": " | ".join(tails)}


def _pytest(cmd: list[str], env: dict, timeout: float) -> tuple[str, object]:
    # its own process group: at the time limit the xdist workers go too, not only pytest
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=timeout)
        return text, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0], "timeout"


# -- 3. correctness ---------------------------------------------------------------------------


def child_logits(path: str, dtype: str, device: str, dump: str) -> None:
    """(in a child process) logits of a ragged, chunked batch and greedy tokens."""
    import torch

    from tessera.engine import LLM
    from tessera.formats import open_checkpoint
    from tessera.models import load_model
    from tessera.models.harness import forward_chunks
    from tessera.sampling import SamplingParams

    torch_dtype = getattr(torch, dtype)
    model = load_model(open_checkpoint(path), torch_dtype, torch.device(device))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    seqs = [torch.randint(300, vocab - 2, (n,), generator=g).tolist() for n in (37, 5, 70)]
    chunks = [[s[: len(s) // 2], s[len(s) // 2 :]] for s in seqs]
    logits = forward_chunks(model, chunks, block_size=16)
    del model
    llm = LLM(path, dtype=dtype, device=device, max_model_len=256, kv_cache_memory=64 << 20)
    outs = llm.generate(seqs, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5))
    # per output step: {token: logprob} of the top 5, for telling near-ties from real differences
    tops = [[dict(step[1:]) for step in o.logprobs] for o in outs]
    saved = {"logits": [x.float().cpu() for x in logits], "tokens": [o.token_ids for o in outs], "tops": tops}
    torch.save(saved, dump)


def correctness(work: Path, env: dict, device: str, small: dict) -> dict:
    import torch
    from make_random_gguf import write

    path = write(str(work / "small.gguf"), scheme="Q4_K", **small)
    runs = {}
    for name, dtype, backend in (
        ("ref32", "float32", "reference"),
        ("ref16", "bfloat16", "reference"),
        ("kern16", "bfloat16", ""),
    ):
        dump = work / f"{name}.pt"
        e = dict(env, TESSERA_KERNELS=backend)
        cmd = [sys.executable, __file__, "--child-logits", str(path), dtype, device, str(dump)]
        r = subprocess.run(cmd, env=e, capture_output=True, text=True)
        child_log(f"correctness {name}", r.stdout + r.stderr)
        if r.returncode:
            return {"error": f"{name}: {r.stderr[-1500:]}"}
        runs[name] = torch.load(dump)

    def rel_err(a, b):
        return statistics.median(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))

    ref_err = rel_err(runs["ref16"]["logits"], runs["ref32"]["logits"])
    kern_err = rel_err(runs["kern16"]["logits"], runs["ref32"]["logits"])
    same = [a == b for a, b in zip(runs["kern16"]["tokens"], runs["ref16"]["tokens"], strict=True)]
    # where the bf16 kernels' greedy text leaves the fp32 reference's, how far apart the two
    # tokens were in the fp32 reference's own logprobs: a near-tie is a gap bf16 rounding can flip
    first_diff, gaps = [], []
    ref = runs["ref32"]
    for s, (a, b) in enumerate(zip(runs["kern16"]["tokens"], ref["tokens"], strict=True)):
        i = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        first_diff.append(i)
        if i is not None:
            top = ref["tops"][s][i]
            gaps.append(top[b[i]] - top[a[i]] if a[i] in top else float("inf"))
    return {
        "logits_rel_err_reference_bf16": ref_err,
        "logits_rel_err_kernels_bf16": kern_err,
        "logits_ok": kern_err <= 2 * ref_err + 1e-6,
        "greedy_equal_to_reference_bf16": same,
        "greedy_first_difference_vs_fp32": first_diff,
        "greedy_fp32_logprob_gap_at_difference": gaps,
        # the tolerance: a flip where fp32's two candidates are within 0.1 nats (bf16 logits carry
        # about 2% relative error here, a few hundredths of a nat on logits of size 1-5)
        "greedy_ok": all(g < 0.1 for g in gaps),
    }


# -- 4. speed ---------------------------------------------------------------------------------


def child_bench(path: str, device: str, dump: str, quick: bool, concurrency: list[int]) -> None:
    """(in a child process) latency, throughput and TTFT under load of one GGUF."""
    import torch

    from tessera.engine import LLM
    from tessera.engine.bench_offline import latency, random_prompts
    from tessera.sampling import SamplingParams

    prefill, prompt, output = (256, 64, 16) if quick else (2048, 512, 128)
    from tessera.engine.recommend import decode_weight_bytes

    c = _config(path)
    per_token = c["layers"] * 2 * c["kv_heads"] * c["head_dim"] * 2
    tokens = max(max(concurrency, default=1) * (prompt + output + 32), prefill + output + 64)
    t0 = time.perf_counter()
    llm = LLM(
        path,
        dtype="bfloat16",
        device=device,
        max_model_len=max(prefill, prompt) + output + 64,
        kv_cache_memory=int(tokens * per_token * 1.1),
        max_num_seqs=max(concurrency, default=1),
        max_num_batched_tokens=max(prefill, 2048),
    )
    load_s = time.perf_counter() - t0
    lat = latency(llm, prefill, 16 if quick else 128, 1 if quick else 3)
    llm.generate(random_prompts(4, 16, c["vocab"], seed=99), SamplingParams(max_tokens=2))  # warm-up
    result = {"prefill_tokens": prefill, "load_s": load_s, **lat, "throughput": {}}
    result["weight_read_bytes"] = decode_weight_bytes(llm.model)  # as the backend holds them
    params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True)
    for n in concurrency:
        llm.reset_prefix_cache()
        prompts = random_prompts(n, prompt, c["vocab"], seed=n)
        t0 = time.perf_counter()
        ids = [llm.add_request(p, params) for p in prompts]
        first: dict[str, float] = {}
        produced, done = 0, set()
        while len(done) < len(ids):
            for o in llm.step():
                if o.request_id not in first and o.token_ids:
                    first[o.request_id] = time.perf_counter() - t0
                if o.finished:
                    done.add(o.request_id)
                    produced += len(o.token_ids)
        seconds = time.perf_counter() - t0
        ttft = sorted(first.values())
        result["throughput"][str(n)] = {
            "output_tok_s": produced / seconds,
            "ttft_median_ms": 1e3 * statistics.median(ttft),
            "ttft_p90_ms": 1e3 * ttft[int(0.9 * (len(ttft) - 1))],
            "prompt_tokens": prompt,
            "output_tokens": output,
        }
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(dump).write_text(json.dumps(result))


def _config(path: str) -> dict:
    """The shape of a GGUF file or an HF folder (config.json), and its decoder's matrix weights."""
    if Path(path).is_dir():
        return _hf_config(Path(path))
    import gguf

    r = gguf.GGUFReader(path)

    def f(name: str) -> int:
        return int(r.fields[f"llama.{name}"].parts[-1][0])

    hidden, heads = f("embedding_length"), f("attention.head_count")
    matrices = sum(int(t.n_elements) for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return {
        "layers": f("block_count"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": f("attention.head_count_kv"),
        "head_dim": hidden // heads,
        "vocab": len(r.fields["tokenizer.ggml.tokens"].data),
        "matrix_params": matrices,
    }


def _hf_config(folder: Path) -> dict:
    """``_config`` of a Llama-layout HF folder: the decoder's matrices from config.json."""
    c = json.loads((folder / "config.json").read_text())
    hidden, heads, ffn = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    head_dim = c.get("head_dim") or hidden // heads
    kv_heads = c.get("num_key_value_heads", heads)
    per_layer = hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 3 * hidden * ffn
    return {
        "layers": c["num_hidden_layers"],
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": c["vocab_size"],
        "matrix_params": c["num_hidden_layers"] * per_layer,
    }


def bench(
    path: Path, env: dict, device: str, quick: bool, concurrency: list[int], reference: bool, timeout: float
) -> dict:
    """Each side (kernels, and the torch reference where asked) in a child process, each given
    at most ``timeout`` seconds, so that a slow load or bench leaves the rest of the budget."""
    c = _config(str(path))
    out = {"shape": c}
    sides = [("kernels", "")] + ([("reference", "reference")] if reference else [])
    for side, backend in sides:
        dump = path.with_suffix(f".{side}.json")
        conc = concurrency if side == "kernels" else concurrency[:1]
        cmd = [sys.executable, __file__, "--child-bench", str(path), device, str(dump), str(int(quick))]
        cmd += [str(n) for n in conc]
        try:
            r = subprocess.run(
                cmd, env=dict(env, TESSERA_KERNELS=backend), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            child_log(f"bench {path.name} {side} (timed out)", _text(e.stdout) + _text(e.stderr))
            out[side] = {"error": f"ran past its {timeout:.0f} s"}
            continue
        child_log(f"bench {path.name} {side}", r.stdout + r.stderr)
        if r.returncode:
            out[side] = {"error": r.stderr[-1500:]}
            continue
        res = json.loads(dump.read_text())
        # bytes one decode token reads: the weights as the backend holds them (linears, LM head,
        # one embedding row) and the KV cache at the decode's mean context (16-token prompt + 64)
        kv = c["layers"] * (16 + 64) * 2 * c["kv_heads"] * c["head_dim"] * 2
        res["decode_bytes_per_token"] = per_token = res["weight_read_bytes"] + kv
        res["decode_hbm_fraction"] = per_token * res["decode_tok_s"] / (HBM_TB_S * 1e12)
        n, t = res["prefill_tokens"], res["prefill_tokens"]
        flops = 2 * c["matrix_params"] * n + 2 * 2 * c["layers"] * c["heads"] * c["head_dim"] * t * t / 2
        res["prefill_bf16_peak_fraction"] = flops * res["prefill_tok_s"] / n / (BF16_TFLOPS * 1e12)
        out[side] = res
    if "reference" in out and "error" not in out["reference"] and "error" not in out["kernels"]:
        k, r = out["kernels"], out["reference"]
        out["ratio_vs_reference"] = {
            "decode": k["decode_tok_s"] / r["decode_tok_s"],
            "prefill": k["prefill_tok_s"] / r["prefill_tok_s"],
        }
    return out


# -- 5. EXL2 ----------------------------------------------------------------------------------

# tiny enough for the CPU; down_proj's 768 inputs give 6 groups, so 5, 4 and 3 bits mix there
EXL2_TINY = dict(layers=2, hidden=256, ffn=768, heads=4, kv_heads=2, vocab=1024)


def bench_exl2(work: Path, env: dict, device: str, smoke: bool, budget: Budget, keep: bool = False) -> dict:
    """Speed of a random EXL2 folder shaped like Llama-3-8B (make_random_exl2.py: about 4.0 bpw,
    5/4/3-bit groups behind a permutation, 6-bit LM head), kernels only: the torch reference
    would hold the 8B model dequantized. ``keep``: leave the folder for the recommend stage."""
    from make_random_exl2 import SHAPES, stored_bits, write

    shapes = {"tiny": EXL2_TINY} if smoke else {"llama3-8b": SHAPES["llama3-8b"]}
    out = {}
    for name, shape in shapes.items():
        if budget.left() < 150:
            out[name] = f"skipped: {budget.left():.0f} s of the budget left"
            continue
        log(f"bench-exl2 {name}: writing the random EXL2 folder")
        t = time.perf_counter()
        path = write(work / f"{name}.exl2", **shape)
        res = {"write_s": time.perf_counter() - t, "stored": stored_bits(path)}
        res |= bench(path, env, device, smoke, [4] if smoke else [64], False, max(60.0, budget.left() - 10))
        if not keep:
            shutil.rmtree(path)
        out[name] = res
        log(f"bench-exl2 {name}: {json.dumps(res)}")
    return out


def exllamav2_stage(work: Path, env: dict, device: str, smoke: bool, budget: Budget, out: Path) -> dict:
    """exllamav2 against tessera on a random EXL2 folder shaped like SmolLM2-135M
    (tools/exllamav2_check.py)."""
    from exllamav2_check import cross_check
    from make_random_exl2 import SHAPES, write

    if budget.left() < 90:
        return {"status": f"skipped: {budget.left():.0f} s of the budget left"}
    folder = write(work / "xcheck" / "model", **(EXL2_TINY if smoke else SHAPES["smollm2-135m"]))
    return cross_check(folder, env, device, max(30.0, budget.left() - 15), out)


# Qwen2.5-Coder-1.5B and -0.5B's shapes (no q/k/v biases here: they cost nothing to speak of)
SPEC_PAIR = {
    "target": dict(layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=151936, rope_theta=1e6),
    "draft": dict(layers=24, hidden=896, ffn=4864, heads=14, kv_heads=2, vocab=151936, rope_theta=1e6),
}


def spec_stage(work: Path, env: dict, device: str, smoke: bool, budget: Budget, out: Path) -> dict:
    """Speculative steps' costs on random weights of the Qwen pair's shapes
    (tools/bench/spec_projection.py in a child process)."""
    from make_random_gguf import write

    if budget.left() < 90:
        return {"status": f"skipped: {budget.left():.0f} s of the budget left"}
    tiny = dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=1024)
    target = write(str(work / "spec-target.gguf"), scheme="Q4_K", **(tiny if smoke else SPEC_PAIR["target"]))
    # 896 is no multiple of Q4_K's 256
    draft = write(str(work / "spec-draft.gguf"), scheme="Q4_0", **(tiny if smoke else SPEC_PAIR["draft"]))
    dump = out / "spec_projection.json"
    cmd = [
        sys.executable, str(Path(__file__).parent / "bench" / "spec_projection.py"),
        "--target", str(target), "--draft", str(draft), "--prompt", "random",
        "--draft-vocab-size", "512" if smoke else "32768", "--quantization", "q4_0",
        "--ks", "1,2" if smoke else "1,2,3,4,6,8", "--max-tokens", "16" if smoke else "64",
        "--json", str(dump),
    ]  # fmt: skip
    timeout = max(60.0, budget.left() - 10)
    try:
        r = subprocess.run(
            cmd, env=dict(env, TESSERA_DEVICE=device), capture_output=True, text=True, timeout=timeout,
            cwd=Path(__file__).parent / "bench",
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        child_log("spec (timed out)", _text(e.stdout) + _text(e.stderr))
        return {"error": f"ran past its {timeout:.0f} s"}
    finally:
        target.unlink(missing_ok=True)
        draft.unlink(missing_ok=True)
    child_log("spec", r.stdout + r.stderr)
    if r.returncode:
        return {"error": r.stderr[-1500:]}
    res = json.loads(dump.read_text())
    return {"table": r.stdout.strip().splitlines()[-(len(res["rows"]) + 3) :], **res}


def recommend_stage(
    work: Path, env: dict, device: str, smoke: bool, budget: Budget, shape_name: str = "smollm2-135m"
) -> dict:
    """Issue 13: ``tessera recommend --verify`` on a random EXL2 folder of ``shape_name`` (for
    Llama-3-8B the one bench-exl2 wrote, where it ran before): the recommended configuration runs
    in a fresh process at 8,192 tokens x batch 4, and its measured peak is set against the
    predicted memory (within 10% passes)."""
    from make_random_exl2 import SHAPES, write

    name, shape = ("tiny", EXL2_TINY) if smoke else (shape_name, SHAPES[shape_name])
    context, batch = (256, 2) if smoke else (8192, 4)
    path = work / f"{name}.exl2"
    res: dict = {"model": f"random EXL2 {name}", "device": device, "context": context, "batch": batch}
    if budget.left() < (150 if name == "llama3-8b" and not path.exists() else 60):
        return {"status": f"skipped: {budget.left():.0f} s of the budget left"}
    res["reused_folder"] = path.exists()
    if not path.exists():
        log(f"recommend {name}: writing the random EXL2 folder")
        t = time.perf_counter()
        write(path, **shape)
        res["write_s"] = round(time.perf_counter() - t, 1)
    cmd = [sys.executable, "-m", "tessera.engine.cli", "recommend", str(path), "--device", device]
    cmd += ["--candidates", "given", "--context", str(context), "--batch", str(batch), "--verify", "--json"]
    timeout = max(60.0, budget.left() - 10)
    log(f"recommend {name}: {' '.join(cmd[3:])} ({timeout:.0f} s at most)")
    t = time.perf_counter()
    text, err, code = _run_session(cmd, env, timeout)
    res["seconds"] = round(time.perf_counter() - t, 1)
    shutil.rmtree(path)
    child_log(f"recommend {name}" + (" (timed out)" if code == "timeout" else ""), text + err)
    if code == "timeout":
        return res | {"status": f"ran past its {timeout:.0f} s"}
    if code:
        return res | {"status": f"exit {code}: {err[-1500:]}"}
    rec = json.loads(text.strip().splitlines()[-1])
    v, choice = rec["verify"], rec["choice"]
    fields = "label kind kv bpw weights kv_bytes activations runtime total max_context".split()
    res |= {
        "status": "ok",
        "predicted": v["predicted"],
        "measured_peak": v["peak"],
        "error": v["error"],
        "within_10pct": abs(v["error"]) <= 0.10,
        "choice": {k: choice[k] for k in fields},
        "memory": rec["memory"],
        "recommendation": rec["recommendation"],
        "verify": v,
    }
    return res


def _run_session(cmd: list[str], env: dict, timeout: float) -> tuple[str, str, object]:
    """(stdout, stderr, exit code or "timeout") of ``cmd`` in a process group of its own: at the
    time limit its children (recommend's check run) go too."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        text, err = proc.communicate(timeout=timeout)
        return text, err, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, err = proc.communicate()
        return text, err, "timeout"


def probe_stage(work: Path, env: dict, out: Path, timeout: float) -> dict:
    """Where a decode step's time goes (tools/bench/gpu_probe.py) on a random Llama-3-8B GGUF."""
    from make_random_gguf import SHAPES, write

    path = work / "probe-llama3-8b.gguf"
    if not path.exists():
        write(str(path), scheme="Q4_K", **SHAPES["llama3-8b"])
    dump = work / "probe.json"
    code = "import sys, gpu_probe; gpu_probe.main(sys.argv[1], sys.argv[2])"
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, str(dump), str(path)], env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        child_log("probe", r.stdout + r.stderr)
        status = "ok" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr[-1500:]}"
    except subprocess.TimeoutExpired as e:
        child_log("probe (timed out)", _text(e.stdout) + _text(e.stderr))
        status = f"ran past its {timeout:.0f} s"
    res = json.loads(dump.read_text()) if dump.exists() else {}
    res["status"] = status
    tables = [d.pop("profile_table") for d in res.get("decode", []) if "profile_table" in d]
    with (out / "probe.txt").open("w") as f:
        for r in res.get("kernels", []):
            f.write(json.dumps(r) + "\n")
        for t in tables:
            f.write(t + "\n")
    return res


# -- 8. distributed (issue 16): the worker executor on NCCL, a disaggregated pair on one GPU --------


def child_executors(path: str, device: str, dtype: str, dump: str) -> None:
    """(in a child process) greedy tokens and single-stream decode of the in-process runner and of
    one worker process (NCCL on a GPU, TP=1): they must be equal."""
    from tessera.engine import LLM
    from tessera.sampling import SamplingParams

    vocab = _config(path)["vocab"]
    seqs = [[(7 * i + j) % (vocab - 300) + 300 for j in range(n)] for i, n in enumerate((37, 5, 70))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    out = {}
    for backend in ("uni", "mp"):
        llm = LLM(path, dtype=dtype, device=device, max_model_len=512, kv_cache_memory=256 << 20,
                  distributed_executor_backend=backend)  # fmt: skip
        tokens = [o.token_ids for o in llm.generate(seqs, params)]
        llm.generate([seqs[0]], params)  # warm
        t = time.perf_counter()
        llm.generate([seqs[0]], SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True))
        out[backend] = {"tokens": tokens, "decode_tok_s": 128 / (time.perf_counter() - t)}
        llm.shutdown()
    out["greedy_equal"] = out["uni"]["tokens"] == out["mp"]["tokens"]
    Path(dump).write_text(json.dumps(out))


def _serve(path: str, device: str, dtype: str, port: int, env: dict, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tessera.engine.cli", "serve", "--model", path, "--device", device,
           "--dtype", dtype, "--port", str(port), "--kv-cache-memory", "256MiB", "--max-model-len", "512",
           *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy in {timeout:.0f} s")


def distributed_stage(work: Path, env: dict, device: str, smoke: bool, budget: Budget) -> dict:
    import socket

    import httpx
    from make_random_gguf import write

    shape = dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=1000)
    path = str(write(str(work / "distributed.gguf"), scheme="Q4_0", **shape))
    dtype = "float32" if smoke else "bfloat16"
    result: dict = {}
    dump = work / "executors.json"
    cmd = [sys.executable, __file__, "--child-executors", path, device, dtype, str(dump)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60.0, budget.left() / 2))
    child_log("distributed: executors", r.stdout + r.stderr)
    if r.returncode:
        result["executors"] = {"error": r.stderr[-1500:]}
    else:
        ex = json.loads(dump.read_text())
        result["executors"] = {
            "greedy_equal": ex["greedy_equal"],
            "decode_tok_s_in_process": round(ex["uni"]["decode_tok_s"], 1),
            "decode_tok_s_worker_process": round(ex["mp"]["decode_tok_s"], 1),
        }

    def port() -> int:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            return sk.getsockname()[1]

    ports = [port() for _ in range(3)]
    role = '{{"kv_role": "{}", "kv_connector": "TCPConnector"}}'
    procs = [
        _serve(path, device, dtype, ports[0], env, "--kv-transfer-config", role.format("kv_producer")),
        _serve(path, device, dtype, ports[1], env, "--kv-transfer-config", role.format("kv_consumer")),
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for u, proc in zip(urls, procs, strict=False):
            _wait_healthy(u, proc, max(60.0, budget.left() / 3))
        router = [sys.executable, "-m", "tessera.engine.cli", "router", "--prefill", urls[0],
                  "--decode", urls[1], "--port", str(ports[2])]  # fmt: skip
        pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(subprocess.Popen(router, env=env, **pipe))
        _wait_healthy(urls[2], procs[2], 60)
        same = []
        for n in (40, 200, 5):
            body = {"prompt": [300 + (11 * j) % 600 for j in range(n)], "max_tokens": 24, "temperature": 0}
            # the producer alone answers as a single server would; the router splits the request
            single = httpx.post(f"{urls[0]}/v1/completions", json=body, timeout=60).json()
            split = httpx.post(f"{urls[2]}/v1/completions", json=body, timeout=60).json()
            same.append(single["choices"][0]["text"] == split["choices"][0]["text"])
        metrics = httpx.get(f"{urls[1]}/metrics", timeout=10).text
        computed = [ln for ln in metrics.splitlines() if ln.startswith("tessera_prompt_tokens_computed")]
        result["disaggregated"] = {"router_equals_single_server": same, "consumer_prompt_counter": computed}
    except Exception as e:  # recorded: the other stages still run
        result["disaggregated"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            child_log("distributed: server", out or "")
    return result


STAGES = (
    "suite",
    "probe",
    "correctness",
    "distributed",
    "bench",
    "bench-exl2",
    "recommend",
    "exllamav2",
    "spec",
)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-logits":
        return child_logits(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-executors":
        return child_executors(*sys.argv[2:6])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-bench":
        path, device, dump, quick, *conc = sys.argv[2:]
        return child_bench(path, device, dump, quick == "1", [int(n) for n in conc])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting stages after this")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--skip-suite", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the torch-reference baseline")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU: checks this script")
    p.add_argument("--suite-paths", default=",".join(SUITE_PATHS), help="what the suite stage runs")
    p.add_argument("--suite-workers", type=int, default=8, help="pytest-xdist workers, where it is installed")
    p.add_argument("--suite-share", type=float, default=0.45, help="of the budget left, the suite's at most")
    p.add_argument("--probe-share", type=float, default=0.4, help="of the budget left, the probe's at most")
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b", help="the bench stage's shapes")
    p.add_argument(
        "--recommend-shape", default="smollm2-135m", choices=["smollm2-135m", "llama3-8b"],
        help="the recommend stage's random EXL2 model (llama3-8b: bench-exl2's folder where it ran)",
    )  # fmt: skip
    p.add_argument("--side-timeout", type=float, default=0.0, help="one bench side's seconds (0: budget)")
    a = p.parse_args()
    stages = {x.strip() for x in a.stages.split(",") if x.strip()}
    if stages - set(STAGES):
        p.error(f"unknown stages {sorted(stages - set(STAGES))}; the stages are {', '.join(STAGES)}")
    if a.skip_suite or a.smoke:
        stages.discard("suite")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    global CHILD_LOG
    CHILD_LOG = out / "children.log"
    budget = Budget(a.budget_s)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = workspace_env(work / "site")
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    import torch

    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    result: dict = {"machine": machine(device), "stages": sorted(stages)}
    log(json.dumps(result["machine"]))

    def save() -> None:  # after every stage: a run stopped at its time limit keeps what it measured
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2))

    save()
    seconds = result["seconds"] = {}
    t0 = time.monotonic()

    def lap(stage: str) -> None:
        nonlocal t0
        seconds[stage] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        save()

    if "exllamav2" in stages and device == "cuda" and importlib.util.find_spec("exllamav2") is not None:
        # its extension takes minutes of nvcc on the CPU cores: built beside the GPU stages
        # before it (the stage's import waits on torch's build lock and then loads it)
        log("exllamav2: building its extension in the background")
        build_log = (out / "exllamav2-build.log").open("w")
        subprocess.Popen(
            [sys.executable, "-c", "import exllamav2"], env=env, stdout=build_log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    if "probe" in stages and device == "cuda":
        result["probe"] = probe_stage(work, env, out, max(60.0, budget.left() * a.probe_share))
        log(f"probe: {json.dumps({k: v for k, v in result['probe'].items() if k != 'kernels'})}")
        decodes = [d for d in result["probe"].get("decode", []) if "decode_tok_s" in d]
        if len(decodes) > 1:  # the benches below run the few-token kernel that decoded faster
            env["TESSERA_CUDA_GEMV"] = max(decodes, key=lambda d: d["decode_tok_s"])["gemv"]
            result["bench_gemv"] = env["TESSERA_CUDA_GEMV"]
        lap("probe")
    if "suite" in stages:
        paths = [x for x in a.suite_paths.split(",") if x]
        timeout = max(60.0, budget.left() * a.suite_share)
        result["suite"] = suite(out, env, timeout, device, paths, a.suite_workers)
        log(f"suite: {result['suite']}")
        lap("suite")
    tiny = dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=1000)
    if "correctness" in stages:
        small = tiny if a.smoke else dict(layers=4, hidden=512, ffn=1536, heads=8, kv_heads=2, vocab=4096)
        result["correctness"] = correctness(work, env, device, small)
        log(f"correctness: {result['correctness']}")
        lap("correctness")
    if "distributed" in stages:
        result["distributed"] = distributed_stage(work, env, device, a.smoke, budget)
        log(f"distributed: {json.dumps(result['distributed'])}")
        lap("distributed")
    if "bench" in stages:
        from make_random_gguf import SHAPES, write

        names = [x for x in a.shapes.split(",") if x]
        shapes = {"smollm2-135m": tiny} if a.smoke else {k: SHAPES[k] for k in names}
        result["bench"] = {}
        for name, shape in shapes.items():
            if budget.left() < 60:
                result["bench"][name] = f"skipped: {budget.left():.0f} s of the budget left"
                continue
            # Q4_K where every matrix is whole super-blocks (SmolLM2's 576 is not: Q4_0 there)
            scheme = "Q4_K" if shape["hidden"] % 256 == 0 and shape["ffn"] % 256 == 0 else "Q4_0"
            log(f"bench {name}: writing the random GGUF ({scheme})")
            path = write(str(work / f"{name}.gguf"), scheme=scheme, **shape)
            conc = [4] if a.smoke else [64, 256]
            timeout = max(60.0, budget.left() - 10)
            if a.side_timeout:
                timeout = min(timeout, a.side_timeout)
            result["bench"][name] = bench(path, env, device, a.smoke, conc, not a.no_reference, timeout)
            result["bench"][name]["scheme"] = scheme
            path.unlink()
            log(f"bench {name}: {json.dumps(result['bench'][name])}")
            lap(f"bench {name}")
    if "bench-exl2" in stages:
        # the recommend stage reuses its folder (an 8B one takes minutes to write)
        keep = "recommend" in stages and a.recommend_shape == "llama3-8b"
        result["bench_exl2"] = bench_exl2(work, env, device, a.smoke, budget, keep=keep)
        lap("bench-exl2")
    # recommend before exllamav2: it runs while exllamav2's extension builds
    if "recommend" in stages:
        result["recommend"] = recommend_stage(work, env, device, a.smoke, budget, a.recommend_shape)
        log(f"recommend: {json.dumps({k: v for k, v in result['recommend'].items() if k != 'verify'})}")
        lap("recommend")
    if "exllamav2" in stages:
        result["exllamav2"] = exllamav2_stage(work, env, device, a.smoke, budget, out)
        log(f"exllamav2: {json.dumps(result['exllamav2'])}")
        lap("exllamav2")
    if "spec" in stages:
        result["spec"] = spec_stage(work, env, device, a.smoke, budget, out)
        log("spec: " + "\n".join(result["spec"].get("table", [json.dumps(result["spec"])])))
        lap("spec")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
