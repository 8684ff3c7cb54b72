"""The app: routes, the checks every request passes (auth, size, draining), and the server's life
(the engine loop, graceful shutdown). Endpoints live in serving_*.py; this file only wires them."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import time
import uuid

import anyio
import msgspec
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..async_llm import AsyncLLM
from ..engine_core import EngineDeadError
from .errors import APIError, overloaded, quote
from .limits import ServerLimits
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from .serving_chat import ServingChat
from .serving_completion import ServingCompletion
from .serving_tokenization import ServingTokenization

logger = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_PATH = re.compile(r"at `\$\.([\w\.\[\]]+)`")
_CLIENT_ID = re.compile(r"[^\w\-.:]")
# bodies above this are decoded in a worker thread (msgspec decodes ~1 GB/s)
_DECODE_INLINE = 1 << 20


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


class Lifecycle:
    """Serving, then draining (after SIGTERM): new requests and /health get 503 while the running
    ones finish, up to ``shutdown_timeout``; then the rest are aborted and the server exits."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.deadline: float | None = None
        self.exit = lambda: None  # set by whoever runs the server

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.deadline = time.monotonic() + self.timeout


async def _watch_drain(llm: AsyncLLM, life: Lifecycle) -> None:
    while not life.draining:
        await anyio.sleep(0.1)
    logger.warning("draining: %d requests running, %.0f s to finish", llm.num_unfinished(), life.timeout)
    while llm.num_unfinished() and time.monotonic() < life.deadline:
        await anyio.sleep(0.1)
    if llm.num_unfinished():
        logger.warning("shutdown timeout: aborting %d requests", llm.num_unfinished())
        llm.abort_all()
        with anyio.move_on_after(5):
            while llm.num_unfinished():
                await anyio.sleep(0.05)
    await anyio.sleep(0.2)  # let the last responses reach their clients
    life.exit()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is larger than this server's limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise ClientGone from e
    return b"".join(chunks)


def _decode(body: bytes, kind: type):
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        m = _PATH.search(str(e))
        raise APIError(400, f"invalid request: {e}", param=m.group(1) if m else None) from e
    except msgspec.DecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid UTF-8 (byte {e.start}): JSON must be UTF-8") from e
    except RecursionError as e:
        raise APIError(400, "the body's JSON is nested too deeply") from e


async def parse(request: Request, kind: type, limits: ServerLimits):
    body = await read_body(request, limits.max_request_body_size)
    if len(body) > _DECODE_INLINE:
        return await anyio.to_thread.run_sync(_decode, body, kind)
    return _decode(body, kind)


def json_response(obj) -> Response:
    return obj if isinstance(obj, Response) else Response(_encode(obj), media_type="application/json")


def build_app(
    llm: AsyncLLM,
    served_model: str,
    api_key: str | None = None,
    on_ready=None,
    limits: ServerLimits | None = None,
    *,
    tool_call_parser: str = "auto",
    enable_auto_tool_choice: bool = True,
) -> Starlette:
    limits = limits or ServerLimits()
    runner = llm.llm.engine.runner  # in this process with the "uni" executor
    metrics = Metrics(
        llm.stats,
        llm.num_waiting,
        runner.encoders if runner is not None else None,
        getattr(llm.llm, "kv_connector", None),
    )
    llm.on_finish = metrics.on_finish
    life = Lifecycle(limits.shutdown_timeout)
    tool_options = dict(tool_call_parser=tool_call_parser, enable_auto_tool_choice=enable_auto_tool_choice)
    chat = ServingChat(llm, served_model, limits, **tool_options)
    completion = ServingCompletion(llm, served_model, limits)
    tokens = ServingTokenization(llm, served_model, limits, **tool_options)  # renders calls as chat does
    created = int(time.time())

    def check_auth(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(
                401,
                "invalid or missing API key (send Authorization: Bearer <key>)",
                "authentication_error",
                code="invalid_api_key",
            )

    def endpoint(handler, *, protected: bool = True, body: type | None = None, when_draining: bool = False):
        async def run(request: Request) -> Response:
            rid = uuid.uuid4().hex  # ours: the client's X-Request-Id is echoed, never used as a key
            client_id = _CLIENT_ID.sub("_", request.headers.get("x-request-id", ""))[:128]
            headers = {"X-Request-Id": client_id or rid}
            try:
                if life.draining and not when_draining:
                    raise overloaded("the server is shutting down", retry_after=5)
                if protected:
                    check_auth(request)
                if body is not None:
                    response = await handler(request, await parse(request, body, limits), rid)
                else:
                    response = await handler(request)
                response = json_response(response)
            except APIError as e:
                metrics.rejected.labels(str(e.status)).inc()
                return e.response(headers)
            except EngineDeadError as e:
                metrics.rejected.labels("503").inc()
                return APIError(503, str(e), "service_unavailable_error", code="engine_dead").response(
                    headers
                )
            except ClientGone:
                metrics.rejected.labels("499").inc()
                logger.debug("request %s: the client left before its body was read", rid)
                return Response(status_code=499)
            except Exception as e:  # a bug of ours: still an OpenAI-shaped answer, and keep serving
                logger.exception("request %s failed", rid)
                metrics.rejected.labels("500").inc()
                error = APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
                return error.response(headers)
            response.headers["X-Request-Id"] = headers["X-Request-Id"]
            return response

        return run

    async def models(request: Request):
        return ModelList(data=[_card()])

    async def model(request: Request):
        chat.check_model(request.path_params["model_id"])
        return _card()

    def _card() -> ModelCard:
        return ModelCard(id=served_model, created=created, max_model_len=llm.max_model_len)

    async def health(request: Request) -> Response:
        if life.draining:
            raise overloaded("the server is shutting down", retry_after=5)
        dead = llm.llm.engine.health()
        if dead is not None:  # a worker process died: this server can't answer any more
            raise APIError(503, dead, "service_unavailable_error", code="engine_dead")
        return Response(status_code=200)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def chat_create(request, req, rid):
        return await chat.create(request, req, rid)

    async def completion_create(request, req, rid):
        return await completion.create(request, req, rid)

    async def tokenize(request, req, rid):
        return await tokens.tokenize(req)

    async def detokenize(request, req, rid):
        return await tokens.detokenize(req)

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "route" if status == 404 else "method"
        return APIError(
            status, f"no {what} {request.method} {quote(request.url.path)}", "not_found_error"
        ).response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with anyio.create_task_group() as tg:
            tg.start_soon(llm.run)
            tg.start_soon(_watch_drain, llm, life)
            if on_ready is not None:
                on_ready()
            yield
            tg.cancel_scope.cancel()
        llm.llm.shutdown()  # the worker processes, if any

    routes = [
        Route("/v1/chat/completions", endpoint(chat_create, body=ChatCompletionRequest), methods=["POST"]),
        Route("/v1/completions", endpoint(completion_create, body=CompletionRequest), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoint(model), methods=["GET"]),
        Route("/tokenize", endpoint(tokenize, body=TokenizeRequest), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize, body=DetokenizeRequest), methods=["POST"]),
        Route("/health", endpoint(health, protected=False, when_draining=True), methods=["GET"]),
        Route("/metrics", endpoint(metrics_endpoint, protected=False, when_draining=True), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.lifecycle = life
    app.state.metrics = metrics
    return app


class _Server(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (see Lifecycle) instead of closing at once;
    a second one exits now."""

    def __init__(self, config: uvicorn.Config, life: Lifecycle) -> None:
        super().__init__(config)
        self.life = life
        life.exit = self._exit

    def _exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        if self.life.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            self.force_exit = self.should_exit
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        self.life.begin_drain()


def serve(app: Starlette, host: str, port: int, log_level: str = "warning") -> None:
    """Run the app with uvicorn until SIGTERM/SIGINT, then drain gracefully."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5
    )
    _Server(config, app.state.lifecycle).run()
