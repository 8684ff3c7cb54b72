"""The server under hostile requests: each gets its OpenAI-shaped 4xx within a second while a
streaming request runs to its normal text, /health answers every 100 ms poll within 200 ms, and
the server's memory stays flat. Then graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("default_model_path")

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 1024
STREAM_BODY = {
    "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
    "max_tokens": 64,
    "temperature": 0,
    "stream": True,
}


SERVE_ARGS = ("--api-key", KEY, "--kv-cache-memory", "128MiB", "--max-model-len", str(MAX_MODEL_LEN))


@pytest.fixture(scope="module")
def server(serve_default_model):
    with serve_default_model(*SERVE_ARGS, "--log-level", "info", "--max-waiting-requests", "64") as url:
        yield url
    assert "Traceback" not in url.log, url.log[-3000:]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _stream_text(url: str, body: dict) -> str:
    text = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for c in chunk["choices"]:
                    text.append(c["delta"].get("content") or "")
    return "".join(text)


_POLLER = """
import json, os, sys, time

import httpx

url, ready, stop, out = sys.argv[1:5]
latencies, failures = [], []
with httpx.Client(timeout=5) as c:
    c.get(url + "/health")
    open(ready, "w").close()
    while not os.path.exists(stop):
        t = time.perf_counter()
        try:
            status = c.get(url + "/health").status_code
            if status != 200:
                failures.append(status)
        except httpx.HTTPError as e:
            failures.append(repr(e))
        latencies.append(time.perf_counter() - t)
        time.sleep(0.1)
with open(out, "w") as f:
    json.dump({"latencies": latencies, "failures": failures}, f)
"""


class _HealthPoller:
    """Polls /health every 100 ms from its own process: the test's client threads (10 MB JSON
    bodies, a 100 MB upload) hold this process's GIL and would be measured as server latency."""

    def __init__(self, url: str, tmp) -> None:
        ready, self.stop_file, self.out = tmp / "ready", tmp / "stop", tmp / "health.json"
        args = [url, str(ready), str(self.stop_file), str(self.out)]
        self.proc = subprocess.Popen([sys.executable, "-c", _POLLER, *args])
        deadline = time.monotonic() + 30
        while not ready.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the /health poller did not start"
        self.latencies: list[float] = []
        self.failures: list = []

    def finish(self) -> None:
        self.stop_file.touch()
        self.proc.wait(timeout=30)
        got = json.loads(self.out.read_text())
        self.latencies, self.failures = got["latencies"], got["failures"]


def _messages(content="hi", role="user"):
    return {"messages": [{"role": role, "content": content}], "max_tokens": 4}


def _deep_bytes(n: int) -> bytes:
    """A chat request whose response_format schema nests n objects (too deep for json.dumps)."""
    schema = '{"type": "object", "properties": {"a": ' * n + '{"type": "string"}' + "}}" * n
    head = json.dumps(_messages())[:-1]
    return f'{head}, "response_format": {{"type": "json_schema", "json_schema": {{"name": "x", "schema": {schema}}}}}}}'.encode()  # noqa: E501


def _deep(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# (name, path, body as JSON value or raw bytes, extra headers, expected status, expected param)
CASES = [
    ("n of a million", "/v1/chat/completions", {**_messages(), "n": 10**6}, {}, 400, "n"),
    ("n of a thousand", "/v1/chat/completions", {**_messages(), "n": 1000}, {}, 400, "n"),
    ("10 MB chat prompt", "/v1/chat/completions", _messages("a " * 5_000_000), {}, 400, "messages"),
    (
        "10 MB text prompt",
        "/v1/completions",
        {"prompt": "a " * 5_000_000, "max_tokens": 1},
        {},
        400,
        "prompt",
    ),
    ("prompt of too many ids", "/v1/completions", {"prompt": [1] * 5000, "max_tokens": 1}, {}, 400, "prompt"),
    (
        "invalid UTF-8",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        {},
        400,
        None,
    ),
    ("not JSON", "/v1/chat/completions", b"{nope", {}, 400, None),
    ("JSON nested 5000 deep", "/v1/chat/completions", _deep_bytes(5000), {}, 400, None),
    (
        "schema nested 100 deep",
        "/v1/chat/completions",
        {
            **_messages(),
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _deep(100)}},
        },
        {},
        400,
        "response_format",
    ),  # noqa: E501
    ("unknown role", "/v1/chat/completions", _messages(role="wizard"), {}, 400, "messages[0].role"),
    (
        "message without content",
        "/v1/chat/completions",
        {"messages": [{"role": "user"}]},
        {},
        400,
        "messages[0].content",
    ),  # noqa: E501
    ("empty messages", "/v1/chat/completions", {"messages": []}, {}, 400, "messages"),
    (
        "tool message without tool_call_id",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
        {},
        400,
        "messages[1].tool_call_id",
    ),  # noqa: E501
    (
        "image part",
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ]
        },
        {},
        400,
        "messages[0].content",
    ),  # noqa: E501
    ("1 MB model name", "/v1/chat/completions", {**_messages(), "model": "m" * 2**20}, {}, 404, "model"),
    (
        "top_logprobs out of range",
        "/v1/chat/completions",
        {**_messages(), "logprobs": True, "top_logprobs": 50},
        {},
        400,
        "top_logprobs",
    ),  # noqa: E501
    (
        "logit_bias outside the vocabulary",
        "/v1/chat/completions",
        {**_messages(), "logit_bias": {"99999999": 1}},
        {},
        400,
        "logit_bias",
    ),  # noqa: E501
    ("too many stop strings", "/v1/completions", {"prompt": "hi", "stop": ["x"] * 1000}, {}, 400, "stop"),
    ("too many prompts", "/v1/completions", {"prompt": ["hi"] * 10_000}, {}, 400, "prompt"),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, {}, 400, "temperature"),
    (
        "60 KB X-Request-Id",
        "/v1/chat/completions",
        {**_messages(), "model": "nope"},
        {"X-Request-Id": "r" * 60_000},
        404,
        "model",
    ),  # noqa: E501
]


def _send(c: httpx.Client, url: str, path: str, body, headers: dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post(
        f"{url}{path}", content=content, headers={**AUTH, "Content-Type": "application/json", **headers}
    )


def test_hostile_requests_get_their_4xx_quickly_while_others_are_served(server, tmp_path):
    pid = server.proc.pid
    baseline = _stream_text(server, STREAM_BODY)
    assert baseline
    rss_before = _rss_mb(pid)
    poller = _HealthPoller(server, tmp_path)
    results: dict = {}
    streamer = threading.Thread(target=lambda: results.setdefault("text", _stream_text(server, STREAM_BODY)))
    streamer.start()
    slow = []
    try:
        with httpx.Client(timeout=30) as c:
            for name, path, body, headers, status, param in CASES:
                t = time.perf_counter()
                r = _send(c, server, path, body, headers)
                took = time.perf_counter() - t
                assert r.status_code == status, (name, r.status_code, r.text[:300])
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, name
                assert len(r.content) < 2048, (name, "the error echoes what it was given")
                if param is not None:
                    assert err["param"] == param, (name, err)
                assert len(r.headers.get("x-request-id", "")) <= 128, name
                if took > 1.0:
                    slow.append((name, took))
            # 100 MB: declared, refused before it is read
            t = time.perf_counter()
            r = c.post(f"{server}/v1/completions", content=b"x" * (100 * 2**20), headers=AUTH)
            assert r.status_code == 413 and r.json()["error"]["message"]
            assert time.perf_counter() - t < 3.0
            # 100 MB streamed without a length: refused as it passes the limit, never held whole
            # (the RSS check below); httpx sends all of it before it reads the answer
            chunks = (b"x" * 2**20 for _ in range(100))
            try:
                r = c.post(f"{server}/v1/completions", content=chunks, headers=AUTH)
                assert r.status_code == 413
            except httpx.HTTPError:
                pass  # the server answered and closed while the client was still sending
    finally:
        streamer.join(timeout=120)
        poller.finish()
    assert not slow, slow
    assert results.get("text") == baseline
    assert not poller.failures, poller.failures
    assert len(poller.latencies) >= 3, poller.latencies
    assert max(poller.latencies) < 0.2, sorted(poller.latencies)[-5:]
    assert _rss_mb(pid) - rss_before < 100, (rss_before, _rss_mb(pid))


def test_the_same_x_request_id_twice_at_once_is_fine(server):
    body = {"prompt": "Once upon a time", "max_tokens": 8}
    with httpx.Client(timeout=60) as c:
        threads, codes = [], []
        for _ in range(2):
            t = threading.Thread(
                target=lambda: codes.append(
                    _send(c, server, "/v1/completions", body, {"X-Request-Id": "same"})
                )
            )
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    assert [r.status_code for r in codes] == [200, 200]
    assert {r.headers["x-request-id"] for r in codes} == {"same"}
    assert codes[0].json()["id"] != codes[1].json()["id"]


def test_models_retrieve_and_unknown_routes_answer_in_json(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    served = client.models.list().data[0].id
    assert client.models.retrieve(served).id == served
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = httpx.get(f"{server}/v1/nowhere", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_client_that_leaves_mid_upload_is_not_a_server_error(server):
    host, port = server.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                + b'{"prompt": "'
                + b"a" * 1000
            )
            time.sleep(0.2)
    time.sleep(0.5)
    metrics = httpx.get(f"{server}/metrics").text
    assert 'tessera_rejected_requests_total{status="500"}' not in metrics
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_full_queue_answers_503_with_retry_after_and_counts_it(server):
    """--max-waiting-requests 64: a burst of 16-choice requests overfills it; the extra get 503s."""
    body = {"prompt": "Count to ten:", "max_tokens": 24, "n": 16, "temperature": 1, "ignore_eos": True}
    codes: list[httpx.Response] = []

    def one():
        with httpx.Client(timeout=120) as c:
            codes.append(_send(c, server, "/v1/completions", body, {}))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in codes)
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    busy = next(r for r in codes if r.status_code == 503)
    assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "overloaded"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'tessera_rejected_requests_total{status="503"}' in metrics
    assert "tessera_num_requests_waiting" in metrics


def test_sigterm_drains_running_requests_then_exits(start_default_model_server):
    url = start_default_model_server(*SERVE_ARGS, "--shutdown-timeout", "60")
    proc = url.proc
    try:
        # long enough (a few seconds) to still be running when the signal comes
        body = {**STREAM_BODY, "max_tokens": 600, "ignore_eos": True}
        baseline = _stream_text(url, body)
        result: dict = {}
        streamer = threading.Thread(target=lambda: result.setdefault("text", _stream_text(url, body)))
        streamer.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.headers["retry-after"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=AUTH, timeout=5)
        assert r.status_code == 503
        streamer.join(timeout=120)
        assert result.get("text") == baseline
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.stdout.read()
    assert "Traceback" not in log, log


def test_sigterm_aborts_what_outlasts_the_shutdown_timeout(start_default_model_server):
    url = start_default_model_server(*SERVE_ARGS, "--shutdown-timeout", "1")
    proc = url.proc
    try:
        body = {**STREAM_BODY, "max_tokens": 900, "ignore_eos": True}
        result: dict = {}

        def run():
            last = None
            with httpx.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        for c in chunk["choices"]:
                            last = c.get("finish_reason") or last
            result["finish"] = last

        t = threading.Thread(target=run)
        t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert result.get("finish") == "abort"
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_same_seeded_request_gives_the_same_text_three_times(server):
    """Issue 10's report: n=3, seed=7, temperature 0.9, default dtype; the second send hits the
    prefix cache, the third runs beside another request."""
    body = {
        "messages": [{"role": "user", "content": "Tell me a story about a dragon and a baker."}],
        "n": 3,
        "seed": 7,
        "temperature": 0.9,
        "max_tokens": 32,
    }
    with httpx.Client(timeout=120) as c:
        first = _send(c, server, "/v1/chat/completions", body, {}).json()
        second = _send(c, server, "/v1/chat/completions", body, {}).json()
        other = threading.Thread(
            target=lambda: _send(
                c, server, "/v1/completions", {"prompt": "Hello there", "max_tokens": 40}, {}
            )
        )
        other.start()
        third = _send(c, server, "/v1/chat/completions", body, {}).json()
        other.join()
    texts = [[ch["message"]["content"] for ch in r["choices"]] for r in (first, second, third)]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert texts[0] == texts[1] == texts[2]
    assert len(set(texts[0])) > 1  # the choices differ from each other (seeds 7, 8, 9)
