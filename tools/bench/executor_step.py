"""The executor's cost per step: one request decoding 300 tokens on the default model, through
one worker process (`mp`) and through the in-process runner (`uni`), in one process; the time of
`LLM.step` and of the executor's `execute_model` per step.

    cd tools/bench && uv run python executor_step.py
"""

from __future__ import annotations

import time

from tessera.engine import LLM
from tessera.sampling import SamplingParams


def per_step(backend: str, tokens: int = 300) -> tuple[float, float]:
    llm = LLM(kv_cache_memory=256 << 20, distributed_executor_backend=backend)
    try:
        llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=20))  # warm
        llm.add_request("Tell me a story", SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        llm.step()  # the prompt
        executor = llm.engine.executor
        inner, spent = executor.execute_model, []

        def timed(so):
            t = time.perf_counter()
            out = inner(so)
            spent.append(time.perf_counter() - t)
            return out

        executor.execute_model = timed
        t, steps = time.perf_counter(), 0
        while llm.has_unfinished_requests():
            llm.step()
            steps += 1
        return (time.perf_counter() - t) / steps, sum(spent) / len(spent)
    finally:
        llm.shutdown()


if __name__ == "__main__":
    for backend in ("mp", "uni"):
        step, execute = per_step(backend)
        print(f"{backend}: step {1e3 * step:.2f} ms, execute_model {1e3 * execute:.2f} ms")
