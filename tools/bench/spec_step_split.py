"""Where a speculative step's time goes at batch 1: drafting (the proposer, its forwards
counted) against the rest of the step (the target verifying k + 1 tokens, sampling), with the
tokens a step emits, and which of the target's tokens the draft's LM head could not propose.

    uv run python tools/bench/spec_step_split.py [--target qwen2.5-coder-1.5b-instruct]
        [--spec '{"method": "draft_model", "model": "qwen2.5-coder-0.5b-instruct",
                  "num_speculative_tokens": 4, "draft_vocab_size": 32768, "quantization": "q4_0"}']
        [--max-tokens 256]

Greedy, the code-writing prompts of ``spec_decode.py``, one after the other; a plain step's time
is measured in the same process (the target without drafts) to express both parts in plain steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import machine
from spec_decode import CODE, _messages

LEAN = {
    "method": "draft_model",
    "model": "qwen2.5-coder-0.5b-instruct",
    "num_speculative_tokens": 4,
    "draft_vocab_size": 32768,
    "quantization": "q4_0",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--spec", default=json.dumps(LEAN))
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()

    from tessera.engine import LLM
    from tessera.sampling import SamplingParams

    llm = LLM(args.target, max_model_len=2048, kv_cache_memory=256 << 20, speculative_config=args.spec)
    runner, proposer = llm.engine.runner, llm.engine.runner.proposer
    spent = {"draft": 0.0, "forwards": 0, "step": 0.0, "steps": 0}

    def timed(fn, key, count):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[key] += time.perf_counter() - t0
            spent[count] += 1
            return out

        return wrapper

    proposer.draft = timed(proposer.draft, "draft", "drafts")
    spent["drafts"] = 0
    if hasattr(proposer, "model"):
        proposer.model.logits = timed(proposer.model.logits, "forward_s", "forwards")
        spent["forward_s"] = 0.0
    runner.execute_model = timed(runner.execute_model, "step", "steps")
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(_messages(c)), add_special_tokens=False) for c in CODE]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    for k in spent:
        spent[k] = 0
    before = llm.stats()
    outs = []
    for ids in prompts:
        llm.reset_prefix_cache()
        outs.append(llm.generate([ids], greedy)[0].token_ids)
    tokens = sum(len(o) for o in outs)

    # a plain step: the same target with its proposer set aside (the median step: not the prefill)
    original, step, times = runner.proposer, runner.execute_model, []

    def plain_step(*a, **k):
        t0 = time.perf_counter()
        out = step(*a, **k)
        times.append(time.perf_counter() - t0)
        return out

    runner.proposer, runner.execute_model = None, plain_step
    llm.reset_prefix_cache()
    llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=64))
    runner.proposer = original
    plain = statistics.median(times[1:])

    head = getattr(getattr(proposer, "model", None), "model", None)
    rows = getattr(getattr(head, "lm_head", None), "vocab_rows", None)
    outside = None
    if rows is not None:
        kept = set(rows.tolist())
        outside = sum(t not in kept for o in outs for t in o) / tokens

    steps = spent["steps"]
    step_ms, draft_ms = spent["step"] / steps * 1e3, spent["draft"] / steps * 1e3
    print(f"# {machine()}; target {args.target}; spec {args.spec}")
    print(f"tokens {tokens} in {steps} steps: {tokens / steps:.2f} a step")
    verify_ms = step_ms - draft_ms
    print(f"a step {step_ms:.1f} ms: drafting {draft_ms:.1f} ms, the rest (verifying) {verify_ms:.1f} ms")
    if spent.get("forwards"):
        print(
            f"draft forwards {spent['forwards'] / steps:.2f} a step, "
            f"{spent['forward_s'] / spent['forwards'] * 1e3:.2f} ms each"
        )
    print(
        f"a plain decode step {plain * 1e3:.1f} ms: verifying = {verify_ms / 1e3 / plain:.2f} plain steps, "
        f"drafting = {draft_ms / 1e3 / plain:.2f}"
    )
    st = llm.stats()
    n_steps, n_spec = st.num_steps - before.num_steps, st.num_spec_steps - before.num_spec_steps
    print(f"engine: {n_steps} steps, {n_spec} of them speculating")
    if outside is not None:
        print(f"target tokens outside the draft head's {rows.numel()} rows: {outside:.1%}")


if __name__ == "__main__":
    main()
