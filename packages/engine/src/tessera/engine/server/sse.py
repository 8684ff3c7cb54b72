"""Server-sent events: one ``data:`` line per chunk, ``[DONE]`` at the end, errors in-band."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from starlette.responses import StreamingResponse

from .errors import APIError

_encode = msgspec.json.Encoder().encode


def sse_response(events: AsyncIterator) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield b"data: " + _encode(event) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except APIError as e:
            # the 200 is already sent: the error travels as an event, as OpenAI does
            yield b"data: " + _encode(e.body()) + b"\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
