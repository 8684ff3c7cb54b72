"""n-gram speculation prompt by prompt (issue 14): for each editing prompt of spec_decode.py, the
share of its answer's tokens that a prompt lookup could predict at all (the last 4, 3 or 2 tokens
found earlier in the prompt and answer, predicting the token that followed them: a bound for any
prompt-lookup proposer), and the speedup over plain decoding, paired, median of ``--rounds``.

    cd tools/bench && uv run python spec_per_prompt.py [--k 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from spec_decode import EDIT

from tessera.engine import LLM
from tessera.sampling import SamplingParams


def predictable(context: list[int], answer: list[int], sizes=(4, 3, 2)) -> int:
    """Answer tokens that the most recent earlier occurrence of the longest suffix predicts."""
    ctx, hits = list(context), 0
    for token in answer:
        guess = None
        for n in sizes:
            if len(ctx) <= n:
                continue
            suffix = ctx[-n:]
            guess = next(
                (ctx[i + n] for i in range(len(ctx) - n - 1, -1, -1) if ctx[i : i + n] == suffix), None
            )
            if guess is not None:
                break
        hits += guess == token
        ctx.append(token)
    return hits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256)
    a = p.parse_args()
    kw = dict(max_model_len=2048, kv_cache_memory=256 << 20)
    spec = {"method": "ngram", "num_speculative_tokens": a.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    plain, ngram = LLM(a.model, **kw), LLM(a.model, speculative_config=spec, **kw)
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens)
    print(f"{a.model}, n-gram k={a.k} adaptive, greedy, median of {a.rounds} paired rounds")
    print("prompt | answer tokens | lookup-predictable | x plain | rounds")
    for j, prompt in enumerate(EDIT):
        text = prompt if isinstance(prompt, str) else prompt[0]
        ids = plain.tokenizer.encode_chat([{"role": "user", "content": text}])
        ratios = []
        for _ in range(a.rounds):
            t = time.perf_counter()
            want = plain.generate([ids], params)[0]
            t_plain = time.perf_counter() - t
            t = time.perf_counter()
            got = ngram.generate([ids], params)[0]
            ratios.append(t_plain / (time.perf_counter() - t))
            assert got.token_ids == want.token_ids, "speculation changed the greedy answer"
        n = len(want.token_ids)
        share = predictable(ids, want.token_ids) / n
        rounds = " ".join(f"{r:.2f}" for r in ratios)
        speedup = statistics.median(ratios)
        print(f"{j} {text.splitlines()[0][:48]!r} | {n} | {share:.0%} | {speedup:.2f} | {rounds}")


if __name__ == "__main__":
    main()
