"""Disaggregated prefill/decode end to end: a KV producer, a KV consumer and `tessera router` in
front, driven by the official openai client, against a single ordinary server of the same model.

Through the router, greedy answers equal the single server's token for token while the consumer
computes no prompt token; a prompt sharing a prefix with an earlier one pulls only the blocks the
consumer's prefix cache lacks; a producer that vanishes mid-transfer gets the client a 503 and
leaks no block on the consumer; a held prompt nobody pulls is freed after the hold timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("default_model_path")  # skips where the model is absent

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m-instruct"
ENGINE = ("--kv-cache-memory", "64MiB", "--max-model-len", "1024")
HOLD_TIMEOUT = 3.0
PRODUCER = {"kv_role": "kv_producer", "kv_connector": "TCPConnector", "kv_hold_timeout": HOLD_TIMEOUT}
CONSUMER = {"kv_role": "kv_consumer", "kv_connector": "TCPConnector", "kv_transfer_timeout": 5}
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three prime numbers.",
]
LONG = (
    "The history of the printing press begins in the fifteenth century, when movable metal type "
    "made books cheap enough for merchants and students to own. Within fifty years presses were "
    "running in more than two hundred cities, and the number of books in Europe grew from thousands "
    "to millions. Scholars argue about how much of the Reformation, the scientific revolution and "
    "the rise of national languages followed from it. "
) * 3 + "In one sentence, the most important consequence of the printing press was"


@dataclass
class Deployment:
    single: str
    producer: str
    consumer: str
    router: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_router(prefill: list[str], decode: list[str], timeout: float = 60):
    port = _free_port()
    args = [sys.executable, "-m", "tessera.engine.cli", "router", "--port", str(port)]
    args += [a for u in prefill for a in ("--prefill", u)] + [a for u in decode for a in ("--decode", u)]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited: {proc.stdout.read()}")
        try:
            httpx.get(f"{url}/v1/models", timeout=1)  # answers (maybe 503) once it listens
            return url, proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("router did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def deployment(start_default_model_server):
    kinds = [
        (),
        ("--kv-transfer-config", json.dumps(PRODUCER)),
        ("--kv-transfer-config", json.dumps(CONSUMER)),
    ]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(start_default_model_server, *ENGINE, *extra) for extra in kinds]
    servers = [f.result() for f in futures if f.exception() is None]
    router_proc = None
    try:
        if len(servers) < 3:
            raise next(f.exception() for f in futures if f.exception() is not None)
        single, producer, consumer = servers
        router, router_proc = start_router([producer], [consumer])
        yield Deployment(single, producer, consumer, router)
    finally:
        if router_proc is not None:
            stop(router_proc)
        for s in servers:
            stop(s.proc)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def chat(url, question, **kw):
    messages = [{"role": "user", "content": question}]
    return client(url).chat.completions.create(
        model=MODEL, messages=messages, **{"temperature": 0, "max_tokens": 24, **kw}
    )


def streamed_chat(url, question):
    chunks = list(chat(url, question, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks[-1].usage.completion_tokens


def complete(url, prompt, **kw):
    return client(url).completions.create(
        model=MODEL, prompt=prompt, **{"temperature": 0, "max_tokens": 16, **kw}
    )


def test_answers_through_the_router_equal_a_single_servers_and_the_consumer_computes_no_prompt(deployment):
    d = deployment
    for q in QUESTIONS:
        a, b = chat(d.router, q), chat(d.single, q)
        assert a.choices[0].message.content == b.choices[0].message.content, q
        assert a.choices[0].finish_reason == b.choices[0].finish_reason
        assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (
            b.usage.prompt_tokens,
            b.usage.completion_tokens,
        )
    assert streamed_chat(d.router, QUESTIONS[0]) == streamed_chat(d.single, QUESTIONS[0])
    a, b = complete(d.router, LONG), complete(d.single, LONG)
    assert a.usage.prompt_tokens > 4 * 16  # more than a few blocks
    assert a.choices[0].text == b.choices[0].text
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (
        b.usage.prompt_tokens,
        b.usage.completion_tokens,
    )
    streamed = "".join(c.choices[0].text for c in complete(d.router, LONG, stream=True) if c.choices)
    assert streamed == b.choices[0].text

    assert metric(d.consumer, "tessera_prompt_tokens_computed_total") == 0
    assert metric(d.consumer, "tessera_kv_transfer_blocks_received_total") > 0
    assert metric(d.producer, "tessera_prompt_tokens_computed_total") > 0
    # every held prompt was pulled and given back
    assert metric(d.producer, "tessera_kv_transfer_holds") == 0
    assert metric(d.producer, "tessera_kv_cache_usage_ratio") == 0


def test_a_shared_prefix_pulls_only_the_blocks_the_consumers_prefix_cache_lacks(deployment):
    d = deployment
    first = [100 + (i * 37) % 4000 for i in range(85)]  # 5 full blocks and 5 tokens
    second = first[:80] + [200 + i for i in range(20)]  # shares the 5 full blocks: 7 blocks
    received = lambda: metric(d.consumer, "tessera_kv_transfer_blocks_received_total")  # noqa: E731
    before = received()
    a = complete(d.router, first)
    assert received() - before == 6
    before = received()
    b = complete(d.router, second)
    assert received() - before == 2
    assert b.usage.prompt_tokens_details.cached_tokens == 80
    assert (a.choices[0].text, b.choices[0].text) == (
        complete(d.single, first).choices[0].text,
        complete(d.single, second).choices[0].text,
    )
    assert metric(d.consumer, "tessera_prompt_tokens_computed_total") == 0


def half_block_producer() -> tuple[socket.socket, int]:
    """A producer that answers one pull, sends half of the first block, and closes."""
    from tessera.engine.kv_wire import PullReply, PullRequest, read_frame, write_frame

    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                req = read_frame(conn, PullRequest)
                write_frame(conn, PullReply())
                conn.sendall(b"\1" * (req.layout.block_nbytes // 2))

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.mark.parametrize("stream", [False, True])
def test_a_producer_that_vanishes_mid_transfer_gets_a_503_and_leaks_no_block(deployment, stream):
    from tessera.engine.kv_connector import prompt_hash

    d = deployment
    server, port = half_block_producer()
    prompt = [300 + i for i in range(70)]
    params = {
        "do_remote_prefill": True,
        "remote_host": "127.0.0.1",
        "remote_port": port,
        "remote_request_id": "gone",
        "prompt_hash": prompt_hash(prompt),
        "first_token_ids": [42],
    }
    failed = metric(d.consumer, "tessera_kv_transfer_pulls_failed_total")
    try:
        with pytest.raises(openai.APIStatusError) as e:
            r = complete(d.consumer, prompt, stream=stream, extra_body={"kv_transfer_params": params})
            list(r) if stream else r
    finally:
        server.close()
    assert e.value.status_code == 503 and "closed after" in str(e.value)
    assert metric(d.consumer, "tessera_kv_transfer_pulls_failed_total") == failed + 1
    assert metric(d.consumer, "tessera_kv_cache_usage_ratio") == 0
    assert metric(d.consumer, "tessera_num_requests_waiting_for_remote_kvs") == 0
    # none of the half-written blocks is found by the next request: its answer is the single server's
    assert complete(d.consumer, prompt).choices[0].text == complete(d.single, prompt).choices[0].text


def test_a_prompt_other_than_the_producers_is_refused_with_400(deployment):
    params = {
        "do_remote_prefill": True,
        "remote_host": "127.0.0.1",
        "remote_port": 1,
        "remote_request_id": "x",
        "prompt_hash": "0" * 32,
        "first_token_ids": [42],
    }
    with pytest.raises(openai.BadRequestError, match="prompt_hash"):
        complete(deployment.consumer, "Hello", extra_body={"kv_transfer_params": params})


def test_a_held_prompt_nobody_pulls_is_freed_after_the_hold_timeout(deployment):
    d = deployment
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    answer = httpx.post(f"{d.producer}/v1/completions", json=body, timeout=60).json()
    params = answer["kv_transfer_params"]
    assert params["do_remote_prefill"] and len(params["remote_block_ids"]) == -(
        -answer["usage"]["prompt_tokens"] // 16
    )
    assert metric(d.producer, "tessera_kv_transfer_holds") == 1
    assert metric(d.producer, "tessera_kv_cache_usage_ratio") > 0
    expired = metric(d.producer, "tessera_kv_transfer_holds_expired_total")
    time.sleep(HOLD_TIMEOUT + 1)
    assert metric(d.producer, "tessera_kv_transfer_holds") == 0
    assert metric(d.producer, "tessera_kv_transfer_holds_expired_total") == expired + 1
    assert metric(d.producer, "tessera_kv_cache_usage_ratio") == 0


def test_requests_the_split_cannot_serve_go_whole_to_the_decode_server(deployment):
    d = deployment
    kw = dict(max_tokens=8, temperature=1.0, n=2, seed=7)
    a, b = complete(d.router, "Once upon a time", **kw), complete(d.single, "Once upon a time", **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    a, b = chat(d.router, QUESTIONS[1], logprobs=True), chat(d.single, QUESTIONS[1], logprobs=True)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_a_router_whose_prefill_server_is_down_answers_503(deployment):
    url, proc = start_router([f"http://127.0.0.1:{_free_port()}"], [deployment.consumer])
    try:
        with pytest.raises(openai.APIStatusError) as e:
            chat(url, QUESTIONS[0])
        assert e.value.status_code == 503 and "prefill server" in str(e.value)
        assert httpx.get(f"{url}/health").status_code == 503
    finally:
        stop(proc)
