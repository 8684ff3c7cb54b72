"""``tessera bench latency`` and ``tessera bench throughput``: the engine in-process, no server.

latency: prefill tokens/s of one prompt (512 tokens by default), its time to first token, and
single-stream decode tokens/s over 128 tokens (from the first token to the last), each the
median of ``--runs`` runs. throughput: aggregate output tokens/s with N requests of 128
prompt + 128 output tokens submitted at once (greedy, EOS ignored), for each N given.

Prompts are random token ids that share no prefix, and the prefix cache is reset before each
run, so every prompt token is computed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import msgspec

from tessera.kernels import backend

from .args import EngineArgs


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token-id prompts with no common prefix (ids below 100 are left out: special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def _llm(ns: argparse.Namespace, max_model_len: int, max_num_seqs: int | None = None):
    from .llm import LLM

    args = EngineArgs.from_cli(ns)
    kwargs = {k: v for k, v in vars(args).items() if k != "model"}
    kwargs["max_model_len"] = kwargs.get("max_model_len") or max_model_len
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max(kwargs.get("max_num_seqs") or 0, max_num_seqs)
    if kwargs.get("kv_cache_memory") is None:
        kwargs["kv_cache_memory"] = 1 << 30
    return LLM(args.model, **kwargs)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False)


def latency(llm, prompt_tokens: int, output_tokens: int, runs: int) -> dict:
    from tessera.sampling import SamplingParams

    vocab = llm.config.vocab_size
    one = SamplingParams(temperature=0.0, max_tokens=1)
    decode = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    llm.generate(random_prompts(1, min(prompt_tokens, 64), vocab, seed=99), one)  # warm-up
    ttfts, decodes = [], []
    spec = []  # per decode run: (drafts, draft tokens, accepted, steps, speculating steps)
    bar = _bar(2 * runs, "latency")
    for r in range(runs):
        llm.reset_prefix_cache()
        (prompt,) = random_prompts(1, prompt_tokens, vocab, seed=r)
        t = time.perf_counter()
        llm.generate([prompt], one)
        ttfts.append(time.perf_counter() - t)
        bar.update()
        llm.reset_prefix_cache()
        (prompt,) = random_prompts(1, 16, vocab, seed=1000 + r)
        before = _spec_counts(llm)
        stamps = [time.perf_counter() for _ in llm.stream(prompt, decode)]
        spec.append([b - a for a, b in zip(before, _spec_counts(llm), strict=True)])
        # a step may yield several tokens (speculative decoding): count tokens, not steps
        decodes.append((output_tokens - 1) / (stamps[-1] - stamps[0]))
        bar.update()
    bar.close()
    ttft = statistics.median(ttfts)
    row = {
        "prefill_tok_s": prompt_tokens / ttft,
        "ttft_ms": ttft * 1e3,
        "decode_tok_s": statistics.median(decodes),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "runs": runs,
    }
    if llm.args.speculative_config is not None:
        drafts, drafted, accepted, steps, spec_steps = map(sum, zip(*spec, strict=True))
        row |= {
            "speculative_config": msgspec.to_builtins(llm.args.speculative_config),
            "spec_acceptance_rate": accepted / drafted if drafted else 0.0,
            "spec_mean_accepted_length": 1 + accepted / drafts if drafts else 0.0,
            "spec_step_share": spec_steps / steps if steps else 0.0,
        }
    return row


def _spec_counts(llm) -> tuple[int, ...]:
    s = llm.stats()
    return (
        s.spec_num_drafts,
        s.spec_num_draft_tokens,
        s.spec_num_accepted_tokens,
        s.num_steps,
        s.num_spec_steps,
    )


def throughput(
    llm, concurrency: int, prompt_tokens: int, output_tokens: int, runs: int, seed: int = 0
) -> dict:
    from tessera.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    llm.generate(random_prompts(2, 16, llm.config.vocab_size, seed=99), SamplingParams(max_tokens=2))
    rates = []
    for r in range(runs):
        llm.reset_prefix_cache()
        prompts = random_prompts(concurrency, prompt_tokens, llm.config.vocab_size, seed=seed + 7919 * r)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - t
        rates.append(sum(len(o.token_ids) for o in outs) / seconds)
    return {
        "output_tok_s": statistics.median(rates),
        "concurrency": concurrency,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "runs": runs,
    }


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="median of this many runs (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    EngineArgs.add_cli_args(p)


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=1, help="median of this many runs (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object per concurrency")
    EngineArgs.add_cli_args(p)


def _common(ns: argparse.Namespace, llm) -> dict:
    declared = backend(llm.device.type)
    return {
        "model": ns.model,
        "dtype": str(llm.dtype).removeprefix("torch."),
        **({"tensor_parallel_size": llm.tensor_parallel_size} if llm.tensor_parallel_size > 1 else {}),
        "quantized_weights": ns.quantized_weights,
        "kernels": declared[0] if declared else "reference",
        **({"c_kernels": declared[1]["c_kernels"]} if declared and "c_kernels" in declared[1] else {}),
    }


def run_latency(ns: argparse.Namespace) -> int:
    llm = _llm(ns, ns.prompt_tokens + ns.output_tokens + 32)
    row = latency(llm, ns.prompt_tokens, ns.output_tokens, ns.runs) | _common(ns, llm)
    if ns.json:
        print(json.dumps(row))
    else:
        print(
            f"prefill {row['prefill_tok_s']:.1f} tok/s ({ns.prompt_tokens} tokens), "
            f"TTFT {row['ttft_ms']:.1f} ms, decode {row['decode_tok_s']:.1f} tok/s "
            f"(median of {ns.runs})"
        )
        if "spec_acceptance_rate" in row:
            print(
                f"speculative: acceptance {row['spec_acceptance_rate']:.1%}, mean accepted length "
                f"{row['spec_mean_accepted_length']:.2f}, {row['spec_step_share']:.1%} of decode steps"
            )
    return 0


def run_throughput(ns: argparse.Namespace) -> int:
    llm = _llm(ns, ns.prompt_tokens + ns.output_tokens + 32, max(ns.concurrency))
    for n in _bar_iter(ns.concurrency):
        row = throughput(llm, n, ns.prompt_tokens, ns.output_tokens, ns.runs) | _common(ns, llm)
        if ns.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"concurrency {n:4d}: {row['output_tok_s']:8.1f} output tok/s", flush=True)
    return 0


def _bar_iter(items):
    from tqdm import tqdm

    return tqdm(items, desc="throughput", file=sys.stderr, disable=None, leave=False)
