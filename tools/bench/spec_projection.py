"""What a draft model's speculation costs on this device, and the speedup that implies at a given
acceptance: a plain decode step against a speculative one at fixed k (k drafted tokens plus the
target verifying k + 1), split into drafting and verifying, in plain steps.

    uv run python tools/bench/spec_projection.py [--target qwen2.5-coder-1.5b-instruct]
        [--draft qwen2.5-coder-0.5b-instruct] [--draft-vocab-size 32768] [--quantization q4_0]
        [--ks 1,2,3,4,6,8] [--acceptance 0.7,0.8,0.87,0.9] [--prompt code|random] [--json OUT]

A step's cost does not depend on how many of its drafts are accepted, so it can be measured on
any pair, random weights included (a GPU run, where the real files cannot be carried: there the
adaptive policy would stop drafting for a pair that never agrees, so k is fixed here). The
projection: each draft token accepted with probability a once reached gives
(1 - a^(k+1)) / (1 - a) tokens a step (``expected_tokens``), so the speedup is that over the
step's cost. With real weights and ``--prompt code`` (the first code-writing prompt of
spec_decode.py) the measured tokens a step and speedup are printed beside it, which checks the
projection on this machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from common import machine
from spec_decode import CODE, _messages


def _timed(obj, name: str, into: list[float]):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        into.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, wrapper)
    return fn


def run(llm, ids: list[int], max_tokens: int, k: int | None) -> dict:
    """Greedy decode of ``ids`` with the proposer drafting exactly ``k`` a step (None: plain):
    the median step, the median drafting within it, tokens a step (after the first two steps:
    the prompt's, and the draft's first catch-up)."""
    from tessera.sampling import SamplingParams

    runner = llm.engine.runner
    steps: list[float] = []
    drafts: list[float] = []
    step_fn = _timed(runner, "execute_model", steps)
    proposer = runner.proposer
    draft_fn = _timed(proposer, "draft", drafts) if proposer is not None else None
    if k is not None:
        runner.spec_policy.max_k = k
    try:
        llm.reset_prefix_cache()
        out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))[0]
    finally:
        runner.execute_model = step_fn
        if draft_fn is not None:
            proposer.draft = draft_fn
    tail = steps[2:]
    per_step = len(out.token_ids) / len(steps)
    return {
        "step_ms": statistics.median(tail) * 1e3,
        "slowest_step_ms": max(tail) * 1e3,
        "draft_ms": statistics.median(drafts[2:]) * 1e3 if len(drafts) > 2 else 0.0,
        "tokens_per_step": per_step,
        "tok_s": per_step / statistics.median(tail),  # at the median step: an outlier moves nothing
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--draft-vocab-size", type=int, default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--ks", default="1,2,3,4,6,8")
    p.add_argument("--acceptance", default="0.7,0.8,0.87,0.9")
    p.add_argument("--prompt", choices=["code", "random"], default="code")
    p.add_argument("--prompt-tokens", type=int, default=256, help="of a random prompt")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--json", default=None, help="write the figures here too")
    a = p.parse_args()

    from tessera.engine import LLM
    from tessera.spec_decode.adaptive import expected_tokens

    ks = [int(x) for x in a.ks.split(",") if x]
    alphas = [float(x) for x in a.acceptance.split(",") if x]
    spec = {"method": "draft_model", "model": a.draft, "num_speculative_tokens": max(ks), "adaptive": False}
    if a.draft_vocab_size:
        spec["draft_vocab_size"] = a.draft_vocab_size
    if a.quantization:
        spec["quantization"] = a.quantization
    kw = dict(max_model_len=a.max_model_len, kv_cache_memory=256 << 20)
    plain = LLM(a.target, **kw)
    spec_llm = LLM(a.target, speculative_config=spec, **kw)
    tok = plain.tokenizer
    if a.prompt == "code":
        ids = tok.encode(tok.apply_chat_template(_messages(CODE[0])), add_special_tokens=False)
    else:
        rng = random.Random(0)
        ids = [rng.randrange(256, plain.config.vocab_size) for _ in range(a.prompt_tokens)]
    run(plain, ids, 8, None)  # warm-up
    run(spec_llm, ids, 8, ks[0])
    base = run(plain, ids, a.max_tokens, None)
    rows = []
    for k in ks:
        r = run(spec_llm, ids, a.max_tokens, k)
        cost = r["step_ms"] / base["step_ms"]
        r.update(
            k=k,
            cost_plain_steps=cost,
            verify_plain_steps=(r["step_ms"] - r["draft_ms"]) / base["step_ms"],
            draft_plain_steps=r["draft_ms"] / base["step_ms"],
            measured_speedup=r["tok_s"] / base["tok_s"],
            projected={f"{al:g}": expected_tokens(al, k) / cost for al in alphas},
        )
        rows.append(r)

    import torch

    where = machine() + (f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    print(f"# {where}; target {a.target}, draft {a.draft} {json.dumps(spec)}; prompt {a.prompt}")
    print(f"plain step {base['step_ms']:.1f} ms, the slowest {base['slowest_step_ms']:.1f}")
    head = " ".join(f"{'a=' + f'{al:g}':>7s}" for al in alphas)
    cols = [("k", 2), ("step ms", 8), ("draft ms", 8), ("verify", 7), ("draft", 6)]
    cols += [("tok/step", 8), ("x meas", 6)]
    print(" ".join(f"{c:>{w}s}" for c, w in cols), head)
    for r in rows:
        proj = " ".join(f"{v:7.2f}" for v in r["projected"].values())
        print(
            f"{r['k']:2d} {r['step_ms']:8.1f} {r['draft_ms']:8.1f} {r['verify_plain_steps']:7.2f} "
            f"{r['draft_plain_steps']:6.2f} {r['tokens_per_step']:8.2f} {r['measured_speedup']:6.2f} {proj}"
        )
    print("(verify, draft: plain steps; x meas: tokens a step over the step's cost; a=: projected speedup)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": where, "spec": spec, "plain": base, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
