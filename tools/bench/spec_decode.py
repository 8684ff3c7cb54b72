"""Speculative decoding against plain decoding, and against llama.cpp's prompt lookup, on the
prompts where it is meant to pay: editing (the answer repeats much of the prompt) and code
writing. Issue 14's speed table.

    uv run --with llama-cpp-python==0.3.36 python tools/bench/spec_decode.py \
        --model qwen2.5-coder-0.5b-instruct --prompts edit \
        --configs plain ngram llama.cpp llama.cpp-lookup [--runs 3] [--max-tokens 256] [--json OUT]
    uv run --with llama-cpp-python==0.3.36 python tools/bench/spec_decode.py \
        --model qwen2.5-coder-1.5b-instruct --prompts code --configs plain draft llama.cpp

Each configuration runs in its own process (so one's memory and threads never touch another's),
greedy, the chat template applied, every prompt of the set one after the other at batch 1; a run
is the whole set, its speed the output tokens of all prompts over their wall time; the median of
``--runs`` runs is reported with the ratio to ``plain`` (tessera without speculation). tessera's
acceptance rate, mean accepted length (tokens a verifying step emits) and share of speculating
steps come from the engine's own counters. Configurations:

- ``plain``: tessera, no speculation;
- ``ngram``: tessera, ``{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
  "prompt_lookup_min": 2}`` (``--k``, adaptive as by default; ``--no-adaptive`` to fix k);
- ``draft``: tessera, ``{"method": "draft_model", "model": DRAFT, "num_speculative_tokens": K}``
  (``--draft``, by default qwen2.5-coder-0.5b-instruct: the 1.5B's draft);
- ``draft-vocab``, ``draft-q``, ``draft-lean``: the same with the draft's LM head cut to
  ``"draft_vocab_size"`` tokens (``--draft-vocab-size``, 32768), with the draft re-quantized
  (``"quantization"``, ``--draft-quantization``, q4_0), and with both;
- ``llama.cpp``: llama-cpp-python on the same GGUF file, 2 threads, greedy;
- ``llama.cpp-lookup``: the same with ``LlamaPromptLookupDecoding(num_pred_tokens=K)``, its
  prompt-lookup speculation (greedy verification).

``--paired``: tessera's configurations load in one process and run in rotating order, round after
round; "x plain" is then the median of the per-round ratios (plain decoding alone moved 20% between
processes here). llama.cpp's configurations still run in processes of their own.

``--concurrency N`` (tessera configurations): N requests submitted at once, the prompts repeated,
the aggregate output tokens/s: whether speculation holds up under load (the adaptive policy should
turn itself off there).

llama-cpp-python is not a workspace dependency: ``uv run --with llama-cpp-python`` adds it for one
run (the first builds it from source, several minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import machine

EDIT = [
    (
        "Add type hints to this function. Reply with the whole function and nothing else.\n\n"
        "def merge_intervals(intervals):\n"
        "    intervals = sorted(intervals, key=lambda iv: iv[0])\n"
        "    merged = []\n"
        "    for start, end in intervals:\n"
        "        if merged and start <= merged[-1][1]:\n"
        "            merged[-1][1] = max(merged[-1][1], end)\n"
        "        else:\n"
        "            merged.append([start, end])\n"
        "    return merged\n\n"
        "def group_by_key(records, key):\n"
        "    groups = {}\n"
        "    for record in records:\n"
        "        groups.setdefault(record[key], []).append(record)\n"
        "    return groups\n"
    ),
    (
        "Fix the typos in this paragraph and return the corrected paragraph only.\n\n"
        "The quick brown fox jumpd over the lazy dog. It was a brigth cold day in April, and the "
        "clocks were striking thirteen. Winston Smith, his chin nuzzled into his breast in an effort "
        "to escape the vile wind, slipped quickly through the glass doors of Victory Mansions, though "
        "not quickly enough to prevent a swirl of gritty dust from entering along with him. The hallway "
        "smelt of boiled cabage and old rag mats."
    ),
    (
        "Rename the variable `tmp` to `total` everywhere in this code and return the code.\n\n"
        "def summarize(orders):\n"
        "    tmp = 0\n"
        "    for order in orders:\n"
        "        if order.status == 'paid':\n"
        "            tmp += order.amount\n"
        "        elif order.status == 'refunded':\n"
        "            tmp -= order.amount\n"
        "    print('total so far', tmp)\n"
        "    return {'total': tmp, 'count': len(orders), 'mean': tmp / max(len(orders), 1)}\n"
    ),
    (
        "Convert this JavaScript function to TypeScript, adding types, and return only the code.\n\n"
        "function parseQuery(query) {\n"
        "  const params = {};\n"
        "  for (const part of query.replace(/^\\?/, '').split('&')) {\n"
        "    if (!part) continue;\n"
        "    const [key, value] = part.split('=');\n"
        "    params[decodeURIComponent(key)] = decodeURIComponent(value || '');\n"
        "  }\n"
        "  return params;\n"
        "}\n"
    ),
]
CODE = [
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "Write a Python class implementing a stack with push, pop, peek and is_empty methods.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Write a Python function that reads a CSV file and returns the sum of one numeric column.",
]
PROMPTS = {"edit": EDIT, "code": CODE}


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


class TesseraArm:
    """One tessera configuration, loaded once; ``run()`` decodes the whole prompt set once."""

    def __init__(self, model: str, spec: dict | None, prompts: list[str], max_tokens: int, concurrency: int):
        from tessera.engine import LLM
        from tessera.sampling import SamplingParams

        kwargs = {"speculative_config": json.dumps(spec)} if spec else {}
        memory = (256 << 20) * max(1, concurrency // 4)
        self.llm = LLM(
            model, max_model_len=2048, kv_cache_memory=memory, max_num_seqs=max(concurrency, 8), **kwargs
        )
        self.spec, self.concurrency = spec, concurrency
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        tok = self.llm.tokenizer
        self.ids = [
            tok.encode(tok.apply_chat_template(_messages(p)), add_special_tokens=False) for p in prompts
        ]
        self.llm.generate([self.ids[0]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        self.before = self.llm.stats()
        self.speeds: list[float] = []
        self.outputs: list[str] = []

    def run(self) -> float:
        llm, tokens, texts = self.llm, 0, []
        t0 = time.perf_counter()
        if self.concurrency > 1:  # the prompts over and over, all submitted at once
            llm.reset_prefix_cache()
            outs = llm.generate([self.ids[i % len(self.ids)] for i in range(self.concurrency)], self.params)
            tokens = sum(len(o.token_ids) for o in outs)
            texts = [o.text for o in outs]
        else:
            for p in self.ids:
                llm.reset_prefix_cache()
                out = llm.generate([p], self.params)[0]
                tokens += len(out.token_ids)
                texts.append(out.text)
        self.speeds.append(tokens / (time.perf_counter() - t0))
        self.outputs = texts
        return self.speeds[-1]

    def row(self) -> dict:
        row = {
            "tok_s": statistics.median(self.speeds),
            "runs": self.speeds,
            "first_output": self.outputs[0][:200],
        }
        if self.spec:
            s, b = self.llm.stats(), self.before
            drafts = s.spec_num_drafts - b.spec_num_drafts
            drafted = s.spec_num_draft_tokens - b.spec_num_draft_tokens
            accepted = s.spec_num_accepted_tokens - b.spec_num_accepted_tokens
            steps, spec_steps = s.num_steps - b.num_steps, s.num_spec_steps - b.num_spec_steps
            row |= {
                "acceptance_rate": accepted / drafted if drafted else 0.0,
                "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0,
                "spec_step_share": spec_steps / steps if steps else 0.0,
            }
            policy = self.llm.engine.runner.spec_policy  # its costs as measured on this machine
            row |= {"token_cost": policy.token_cost, "draft_cost": policy.draft_cost}
        return row


def run_tessera(
    model: str, spec: dict | None, prompts: list[str], runs: int, max_tokens: int, concurrency: int = 1
) -> dict:
    arm = TesseraArm(model, spec, prompts, max_tokens, concurrency)
    for _ in range(runs):
        arm.run()
    return arm.row()


def run_paired(args, specs: dict[str, dict | None], prompts: list[str]) -> list[dict]:
    """Every tessera configuration in this one process, run after run in rotating order, so that
    the machine's drift between processes (plain decoding moved 20% here) falls on all alike;
    each configuration's ``x_plain`` is the median of its per-round ratios to plain."""
    arms = {
        name: TesseraArm(args.model, spec, prompts, args.max_tokens, args.concurrency)
        for name, spec in specs.items()
    }
    names = list(arms)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        speeds = {n: arms[n].run() for n in order}
        for n in names:
            ratios[n].append(speeds[n] / speeds["plain"])
    return [
        {"config": n, **arms[n].row(), "x_plain": statistics.median(ratios[n]), "rounds": ratios[n]}
        for n in names
    ]


def run_llama_cpp(model: str, lookup_k: int | None, prompts: list[str], runs: int, max_tokens: int) -> dict:
    from llama_cpp import Llama

    from tessera.engine import resolve_model

    kwargs = {}
    if lookup_k:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=lookup_k)
    llm = Llama(str(resolve_model(model)), n_ctx=2048, n_threads=2, verbose=False, **kwargs)
    llm.create_chat_completion(_messages(prompts[0]), max_tokens=4, temperature=0.0)  # warm-up
    speeds, outputs = [], []
    for _ in range(runs):
        tokens, t0 = 0, time.perf_counter()
        texts = []
        for p in prompts:
            llm.reset()
            r = llm.create_chat_completion(_messages(p), max_tokens=max_tokens, temperature=0.0)
            tokens += r["usage"]["completion_tokens"]
            texts.append(r["choices"][0]["message"]["content"])
        speeds.append(tokens / (time.perf_counter() - t0))
        outputs = texts
    return {"tok_s": statistics.median(speeds), "runs": speeds, "first_output": outputs[0][:200]}


TESSERA = ("plain", "ngram", "draft", "draft-vocab", "draft-q", "draft-lean")


def spec_of(config: str, args) -> dict | None:
    if config == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": args.k,
            "prompt_lookup_max": 4,
            "prompt_lookup_min": 2,
            "adaptive": not args.no_adaptive,
        }
    if config.startswith("draft"):
        spec = {
            "method": "draft_model",
            "model": args.draft,
            "num_speculative_tokens": args.k,
            "adaptive": not args.no_adaptive,
        }
        if config in ("draft-vocab", "draft-lean"):
            spec["draft_vocab_size"] = args.draft_vocab_size
        if config in ("draft-q", "draft-lean"):
            spec["quantization"] = args.draft_quantization
        return spec
    return None


def child(args) -> None:
    prompts = PROMPTS[args.prompts]
    if args.config == "paired":
        for row in run_paired(args, {c: spec_of(c, args) for c in args.configs if c in TESSERA}, prompts):
            print(json.dumps(row))
        return
    if args.config in TESSERA:
        row = run_tessera(
            args.model, spec_of(args.config, args), prompts, args.runs, args.max_tokens, args.concurrency
        )
    else:
        lookup = args.k if args.config == "llama.cpp-lookup" else None
        row = run_llama_cpp(args.model, lookup, prompts, args.runs, args.max_tokens)
    print(json.dumps({"config": args.config, **row}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--prompts", choices=PROMPTS, default="edit")
    p.add_argument("--configs", nargs="+", default=["plain", "ngram", "llama.cpp", "llama.cpp-lookup"])
    p.add_argument("--k", type=int, default=4, help="speculative tokens (num_pred_tokens for llama.cpp)")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="the draft of config draft")
    p.add_argument(
        "--draft-vocab-size", type=int, default=32768, help="draft-vocab, draft-lean: the draft head's tokens"
    )
    p.add_argument("--draft-quantization", default="q4_0", help="draft-q, draft-lean: the draft re-quantized")
    p.add_argument("--no-adaptive", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="tessera only: this many requests at once (the prompts repeated), aggregate tokens/s",
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument(
        "--paired",
        action="store_true",
        help="tessera's configurations in one process, run after run in rotating order; x plain is "
        "the median of per-round ratios",
    )
    p.add_argument("--json", help="also write the rows there")
    p.add_argument("--config", help=argparse.SUPPRESS)  # a child process: run this one configuration
    args = p.parse_args()
    if args.config:
        child(args)
        return
    from tqdm import tqdm

    rows = []
    children = list(args.configs)
    if args.paired:
        if "plain" not in args.configs:
            raise SystemExit("--paired compares with plain: list it in --configs")
        children = ["paired", *(c for c in args.configs if c not in TESSERA)]
    for config in tqdm(children, desc="configurations", disable=None):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--config", config]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{config} failed:\n{r.stderr[-3000:]}")
        lines = r.stdout.strip().splitlines()
        rows.extend(json.loads(line) for line in (lines if config == "paired" else lines[-1:]))
    base = next((r["tok_s"] for r in rows if r["config"] == "plain"), None)
    print(
        f"# {machine()}; model {args.model}, prompts {args.prompts}, k {args.k}, "
        f"concurrency {args.concurrency}, median of {args.runs}"
    )
    print(f"{'config':18s} {'tok/s':>8s} {'x plain':>8s} {'accept':>7s} {'mean len':>9s} {'spec steps':>10s}")
    for r in rows:
        ratio = f"{r.get('x_plain', r['tok_s'] / base if base else float('nan')):8.2f}"
        extra = (
            f"{r['acceptance_rate']:7.1%} {r['mean_accepted_length']:9.2f} {r['spec_step_share']:10.1%}"
            if "acceptance_rate" in r
            else f"{'-':>7s} {'-':>9s} {'-':>10s}"
        )
        rounds = " ".join(f"{x:.2f}" for x in r.get("rounds", [])) if r["config"] != "plain" else ""
        print(f"{r['config']:18s} {r['tok_s']:8.1f} {ratio} {extra}  {rounds}".rstrip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
