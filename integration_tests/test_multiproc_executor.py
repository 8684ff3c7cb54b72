"""The multiprocess executor: the model in a worker process per rank, steps as msgspec bytes.

Its outputs equal the in-process engine's (greedy, seeded sampling, a JSON schema, n-gram
speculation); a worker killed mid-generation fails the in-flight requests at once, frees their
blocks and refuses new ones; through the server, /health turns 503 and SIGTERM exits cleanly."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from integration_tests.conftest import start_server, stop_server
from tessera.engine import LLM
from tessera.engine.engine_core import EngineDeadError
from tessera.sampling import SamplingParams, StructuredOutput

MODEL = "smollm2-135m-instruct"
KW = dict(dtype="float32", kv_cache_memory=64 << 20, max_model_len=512, seed=0)
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):",
    "Name three colours.",
]
SCHEMA = '{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}'


def _params():
    return [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24),
        SamplingParams(temperature=0, max_tokens=24, structured=StructuredOutput(json_schema=SCHEMA)),
    ]


def _model_or_skip():
    try:
        from tessera.engine.model_source import resolve_model

        resolve_model(MODEL)
    except Exception as e:  # pragma: no cover - the default model ships with the workspace
        pytest.skip(f"the default model is not installed: {e}")


def _outputs(llm: LLM):
    return [(o.token_ids, o.finish_reason) for o in llm.generate(PROMPTS, _params())]


def test_worker_process_gives_the_in_process_tokens_with_speculation_and_grammars():
    _model_or_skip()
    uni = LLM(MODEL, speculative_config=SPEC, **KW)
    expected = _outputs(uni)
    assert uni.engine.runner is not None
    mp = LLM(MODEL, speculative_config=SPEC, distributed_executor_backend="mp", **KW)
    try:
        assert mp.engine.runner is None and len(mp.engine.executor.pids) == 1
        assert _outputs(mp) == expected
        stats = mp.stats()
        assert stats.spec_num_drafts > 0  # the worker's proposer drafted, the scheduler verified
        kv = mp.engine.scheduler.kv
        assert stats.num_running == 0 and kv.num_free_blocks == kv.num_blocks
    finally:
        mp.shutdown()


def test_a_killed_worker_fails_the_running_requests_and_frees_their_blocks():
    _model_or_skip()
    llm = LLM(MODEL, distributed_executor_backend="mp", **KW)
    kv = llm.engine.scheduler.kv
    for p in PROMPTS[:2]:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    for _ in range(3):
        llm.step()
    assert kv.num_free_blocks < kv.num_blocks
    (pid,) = llm.engine.executor.pids
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
        for _ in range(50):
            llm.step()
    assert time.monotonic() - start < 10
    assert not llm.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks
    assert "SIGKILL" in llm.engine.health()
    with pytest.raises(EngineDeadError):
        llm.add_request("hello")
    llm.shutdown()


def test_a_step_that_raises_in_the_worker_fails_alone_and_the_engine_goes_on():
    """An exception in a worker's step (here: a step naming a request it never got) ends that
    step's requests with an error, as the in-process runner would, and the worker serves on."""
    from tessera.engine.executor import StepFailedError
    from tessera.scheduler import CachedRequestData, SchedulerOutput

    _model_or_skip()
    llm = LLM(MODEL, distributed_executor_backend="mp", **KW)
    try:
        bad = SchedulerOutput([], [CachedRequestData("ghost", [[]], 3, 4)], {"ghost": 1}, 1)
        with pytest.raises(StepFailedError, match="rank 0: KeyError: 'ghost'"):
            llm.engine.executor.execute_model(bad)
        assert llm.engine.health() is None
        out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=8))[0]
        assert len(out.token_ids) == 8
    finally:
        llm.shutdown()


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _worker_pids(server_pid: int) -> list[int]:
    pids = []
    for child in _children(server_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"multiprocessing.spawn" in cmd and b"resource_tracker" not in cmd:
            pids.append(child)
    return pids


def test_server_with_a_killed_worker_fails_the_stream_reports_unhealthy_and_exits_on_sigterm():
    _model_or_skip()
    url = start_server(
        "--model", MODEL, "--distributed-executor-backend", "mp", "--kv-cache-memory", "64MiB",
        "--max-model-len", "512",
    )  # fmt: skip
    try:
        (worker,) = _worker_pids(url.proc.pid)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to one thousand."}],
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        events: list[str] = []
        ended = threading.Event()

        def stream():
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        events.append(line)
            finally:
                ended.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        deadline = time.time() + 30
        while sum('"content"' in e for e in events) < 5 and time.time() < deadline:
            time.sleep(0.05)
        assert sum('"content"' in e for e in events) >= 5, events[:3]
        os.kill(worker, signal.SIGKILL)
        assert ended.wait(10), "the stream did not end after its worker died"
        text = "\n".join(events)
        assert "engine_dead" in text and "SIGKILL" in text, text[-500:]
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
        refused = httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=10
        )
        assert refused.status_code == 503, refused.text
        assert _worker_pids(url.proc.pid) == []  # nothing left running
    finally:
        url.proc.send_signal(signal.SIGTERM)
        try:
            url.proc.wait(30)
        finally:
            log = stop_server(url)
    # uvicorn re-raises the signal it drained for: exit status -SIGTERM, after a clean shutdown
    assert url.proc.returncode in (0, -signal.SIGTERM), log[-2000:]
    assert "Traceback" not in log.split("killed by SIGKILL")[-1], log[-2000:]
    assert not os.path.exists(f"/proc/{worker}")  # reaped
