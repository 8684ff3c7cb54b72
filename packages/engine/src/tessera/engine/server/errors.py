"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

import msgspec
from starlette.responses import Response

from .protocol import ErrorBody, ErrorResponse

_encode = msgspec.json.Encoder().encode

# what a message may quote of the client's input, and how long a message may get at all
QUOTE_CHARS = 64
MESSAGE_CHARS = 512


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """``repr``-like text of a client's value, cut to a short prefix (never echo a megabyte back)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        return f"{text[:limit]!r}... ({len(text)} characters)"
    return repr(text) if isinstance(value, str) else text


def _cut(message: str) -> str:
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "... (cut)"


class APIError(Exception):
    """A request refused (4xx) or failed (5xx); ``response()`` is what the client gets."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = _cut(message)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorBody(self.message, self.type, self.param, self.code))

    def response(self, headers: dict | None = None) -> Response:
        return Response(
            _encode(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers={**self.headers, **(headers or {})},
        )


def overloaded(message: str, retry_after: int = 1) -> APIError:
    """503 with Retry-After: the server is full or draining; the same request may succeed later."""
    return APIError(
        503,
        message,
        "service_unavailable_error",
        code="overloaded",
        headers={"Retry-After": str(retry_after)},
    )


ENGINE_FAILED = APIError(500, "the engine failed on this request", "server_error")
ENGINE_STOPPED = "the engine stopped"  # how EngineCore's reason begins when a worker died


def engine_failed(out) -> APIError:
    """The error for a request that ended with finish reason "error": 503 when the engine can't
    run any more (a worker process died), else 500 with the reason."""
    reason = out.stop_reason or ""
    if reason.startswith(ENGINE_STOPPED):
        return APIError(503, reason, "service_unavailable_error", code="engine_dead")
    if reason:
        return APIError(500, f"the engine failed on this request: {reason}", "server_error")
    return ENGINE_FAILED
