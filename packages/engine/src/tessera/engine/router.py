"""``tessera router``: the front of a disaggregated deployment. Each chat or completion request's
prompt goes to a prefill server (a KV producer, round robin) as a one-token request; its answer
says where the prompt's K/V waits, and the request goes on, with that, to a decode server (a KV
consumer), which pulls the K/V instead of computing the prompt and streams the rest back.

Requests the split cannot serve token for token (several choices or prompts, logprobs, echo) go
whole to a decode server; a request for one token goes whole to a prefill server; a prompt whose
one token ended it (a stop token or string) is answered with the prefill server's answer."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

logger = logging.getLogger(__name__)

_FORWARDED_HEADERS = ("authorization", "x-request-id")
_ANSWER_HEADERS = ("content-type", "x-request-id", "retry-after", "cache-control")
_MAX_BODY = 32 << 20


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"Retry-After": "1"} if status == 503 else None
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _unavailable(message: str) -> Response:
    return _error(503, message, "service_unavailable_error", code="backend_unavailable")


class Router:
    def __init__(self, prefill: list[str], decode: list[str], timeout: float | None = None) -> None:
        if not prefill or not decode:
            raise ValueError("the router needs at least one --prefill and one --decode server")
        self.prefill = [u.rstrip("/") for u in prefill]
        self.decode = [u.rstrip("/") for u in decode]
        self._next_prefill = itertools.cycle(self.prefill)
        self._next_decode = itertools.cycle(self.decode)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))

    # -- the split ------------------------------------------------------------------------------

    async def completion(self, request: Request, path: str) -> Response:
        raw = await request.body()
        if len(raw) > _MAX_BODY:
            return _error(413, f"the request body is larger than the router's limit of {_MAX_BODY} bytes",
                          "invalid_request_error")  # fmt: skip
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        headers["content-type"] = "application/json"
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):  # the decode server says what is wrong with it
            return await self._proxy(next(self._next_decode), path, raw, headers)
        route = _route(body, path)
        if route == "decode":
            return await self._proxy(next(self._next_decode), path, raw, headers)
        if route == "prefill":
            return await self._proxy(next(self._next_prefill), path, raw, headers)

        prefill = next(self._next_prefill)
        first = {k: v for k, v in body.items() if k not in ("max_completion_tokens", "stream_options")}
        first |= {"max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
        if body.get("min_tokens"):  # its one token may not be EOS either
            first["min_tokens"] = 1
        try:
            r = await self.client.post(f"{prefill}{path}", content=json.dumps(first), headers=headers)
        except httpx.HTTPError as e:
            return _unavailable(f"the prefill server {prefill} is unavailable: {_why(e)}")
        if r.status_code != 200:  # its refusal is the client's answer (a bad request, overload, ...)
            return Response(r.content, r.status_code, headers=_answer_headers(r))
        try:
            answer = r.json()
            params = answer.pop("kv_transfer_params", None)
        except (ValueError, AttributeError):
            return _error(502, f"the prefill server {prefill} sent an answer that is not a completion",
                          "server_error")  # fmt: skip
        if params is None:  # the prompt's one token ended the request: that is the whole answer
            return _as_answer(answer, body, path)
        second = dict(body, kv_transfer_params=params)
        return await self._proxy(next(self._next_decode), path, json.dumps(second).encode(), headers)

    async def _proxy(self, base: str, path: str, content: bytes, headers: dict) -> Response:
        """The backend's answer as it comes (a stream stays a stream)."""
        req = self.client.build_request("POST", f"{base}{path}", content=content, headers=headers)
        try:
            r = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            return _unavailable(f"the server {base} is unavailable: {_why(e)}")

        async def body():
            try:
                async for chunk in r.aiter_raw():
                    yield chunk
            finally:  # also when the client leaves mid-stream
                await r.aclose()

        return StreamingResponse(body(), status_code=r.status_code, headers=_answer_headers(r))

    # -- the rest -------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        base = next(self._next_decode)
        try:
            r = await self.client.get(f"{base}{request.url.path}", headers=headers)
        except httpx.HTTPError as e:
            return _unavailable(f"the server {base} is unavailable: {_why(e)}")
        return Response(r.content, r.status_code, headers=_answer_headers(r))

    async def health(self, request: Request) -> Response:
        """200 when every prefill and decode server is healthy; else 503 naming those that aren't."""
        down: list[str] = []

        async def check(url: str) -> None:
            try:
                r = await self.client.get(f"{url}/health", timeout=5)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                down.append(url)

        async with anyio.create_task_group() as tg:
            for url in dict.fromkeys(self.prefill + self.decode):
                tg.start_soon(check, url)
        if down:
            return _unavailable(f"not healthy: {', '.join(sorted(down))}")
        return Response(status_code=200)


def _route(body: dict, path: str) -> str:
    """ "split", or where the whole request goes: "decode" for what a split can't serve token for
    token, "prefill" for a request of one token."""
    if body.get("kv_transfer_params") is not None or body.get("n", 1) not in (1, None):
        return "decode"
    if path.endswith("/chat/completions"):
        if body.get("logprobs"):
            return "decode"
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        prompt = body.get("prompt")
        one_prompt = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
        )
        if not one_prompt or body.get("logprobs") is not None or body.get("echo"):
            return "decode"
        max_tokens = body.get("max_tokens", 16)
    return "prefill" if max_tokens == 1 else "split"


def _as_answer(answer: dict, body: dict, path: str) -> Response:
    """The prefill server's whole answer, as a stream of chunks when the client asked for one."""
    if not body.get("stream"):
        return Response(json.dumps(answer), media_type="application/json")
    chat = path.endswith("/chat/completions")
    base = {
        "id": answer.get("id"),
        "created": answer.get("created", int(time.time())),
        "model": answer.get("model"),
    }
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    choice = answer["choices"][0]
    if chat:
        message = choice.get("message", {})
        chunks = [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
            {
                "index": 0,
                "delta": {"content": message.get("content")},
                "finish_reason": choice.get("finish_reason"),
            },
        ]
    else:
        chunks = [{"index": 0, "text": choice.get("text", ""), "finish_reason": choice.get("finish_reason")}]
    events = [dict(base, choices=[c]) for c in chunks]
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(dict(base, choices=[], usage=answer.get("usage")))
    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    return Response(data, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _answer_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower() in _ANSWER_HEADERS}


def _why(e: Exception) -> str:
    if isinstance(e, httpx.ConnectError):
        return "cannot connect"
    if isinstance(e, httpx.TimeoutException):
        return "it did not answer in time"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def build_router_app(router: Router) -> Starlette:
    async def chat(request: Request) -> Response:
        return await router.completion(request, "/v1/chat/completions")

    async def completions(request: Request) -> Response:
        return await router.completion(request, "/v1/completions")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await router.client.aclose()

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", router.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", router.models, methods=["GET"]),
        Route("/health", router.health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def add_args(p) -> None:
    p.add_argument("--prefill", action="append", required=True, metavar="URL",
                   help="a prefill server (tessera serve with a kv_producer --kv-transfer-config); "
                   "repeat for several, used round robin")  # fmt: skip
    p.add_argument("--decode", action="append", required=True, metavar="URL",
                   help="a decode server (kv_consumer); repeat for several")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def run(ns) -> int:
    for url in (*ns.prefill, *ns.decode):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not a server URL (http://HOST:PORT)")
    app = build_router_app(Router(ns.prefill, ns.decode))
    logger.info("routing prefills to %s, decodes to %s", ns.prefill, ns.decode)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, access_log=False)
    return 0
