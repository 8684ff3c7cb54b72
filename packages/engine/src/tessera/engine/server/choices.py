"""A request's n choices (times its prompts) run as separate engine requests and are gathered
here: all to the end for a plain response, or merged as they come for a stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import msgspec
from starlette.requests import Request

from tessera.sampling import SamplingParams

from ..async_llm import AsyncLLM, Prepared, RequestStream
from ..outputs import RequestOutput
from .errors import APIError, engine_failed


def start_choices(
    llm: AsyncLLM, prepared: Prepared, params: SamplingParams, rid: str, req, kv_transfer=None
) -> list[RequestStream]:
    """One engine request per choice; choice i of a seeded request samples with seed + i.
    ``kv_transfer``: the KVTransferParams of a disaggregated request (one choice)."""
    gens = []
    for i in range(params.n):
        p = (
            params
            if params.n == 1
            else msgspec.structs.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
        )
        gens.append(
            llm.generate(
                prepared,
                p,
                request_id=f"{rid}-{i}",
                priority=req.priority,
                cache_salt=req.cache_salt,
                kv_transfer=kv_transfer,
            )
        )
    return gens


async def run_to_end(request: Request, gens) -> list[RequestOutput]:
    """Run all choices to the end; a client that goes away aborts them."""
    finals: list[RequestOutput | None] = [None] * len(gens)

    async def consume(i, gen):
        try:
            async for out in gen:
                finals[i] = out
        finally:
            gen.close()

    try:
        async with anyio.create_task_group() as tg:

            async def watch():
                while True:
                    if await request.is_disconnected():
                        tg.cancel_scope.cancel()
                        return
                    await anyio.sleep(0.25)

            async def run_all():
                async with anyio.create_task_group() as inner:
                    for i, g in enumerate(gens):
                        inner.start_soon(consume, i, g)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            tg.start_soon(run_all)
    finally:
        for g in gens:
            g.close()
    if any(f is None for f in finals):
        raise APIError(499, "client disconnected")
    for f in finals:
        if f.finish_reason == "error":
            raise engine_error(f)
    return finals


def engine_error(out: RequestOutput) -> APIError:
    """The answer for a request that ended in error: 503 where the producer of its prompt's K/V
    vanished or timed out (another try may succeed), 400 where it refused the request, else 500."""
    failure = out.kv_transfer_failure
    if failure is not None and failure.retryable:
        return APIError(
            503,
            f"the prompt's KV cache could not be fetched: {failure.message}",
            "service_unavailable_error",
            code="kv_transfer_failed",
            headers={"Retry-After": "1"},
        )
    if failure is not None:
        return APIError(400, failure.message, param="kv_transfer_params", code="kv_transfer_failed")
    return engine_failed(out)  # 503 where a worker died, else 500


class Prefetched:
    """A request stream whose first output has arrived: a streamed answer that starts only once
    it is known not to fail at once (a consumer's pull of its prompt's K/V), so that a failure
    still gets its HTTP status."""

    def __init__(self, gen: RequestStream, first: RequestOutput) -> None:
        self._gen = gen
        self._first: RequestOutput | None = first

    def __aiter__(self) -> Prefetched:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            out, self._first = self._first, None
            return out
        return await self._gen.__anext__()

    def close(self) -> None:
        self._gen.close()


async def prefetch(gen: RequestStream) -> Prefetched:
    """Wait for the stream's first output; APIError if the request ended in error there."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without an answer", "server_error") from None
    except BaseException:
        gen.close()
        raise
    if first.finish_reason == "error":
        raise engine_error(first)
    return Prefetched(gen, first)


async def merged(gens) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from all choices as they come."""
    send, recv = anyio.create_memory_object_stream(1024)

    async def pump(i, gen):
        try:
            async for out in gen:
                await send.send((i, out))
        finally:
            gen.close()

    try:
        async with anyio.create_task_group() as tg:

            async def run_all():
                async with send, anyio.create_task_group() as inner:
                    for i, g in enumerate(gens):
                        inner.start_soon(pump, i, g)

            tg.start_soon(run_all)
            try:
                async with recv:
                    async for item in recv:
                        yield item
            except GeneratorExit:
                # closed early (an error ended the stream, the client left): stop the pumps and
                # end here; left to the task group, GeneratorExit would come out as a group
                tg.cancel_scope.cancel()
    finally:
        for g in gens:  # a client gone before every choice started: abort the rest too
            g.close()


def safe_delta(out: RequestOutput, emitted: list[int], i: int, holdback: int) -> str:
    """New text of choice i that can't be taken back: while the request runs, the last
    ``holdback`` characters may yet turn out to start a stop string and be cut."""
    safe = out.text if out.finished else out.text[: max(emitted[i], len(out.text) - holdback)]
    delta = safe[emitted[i] :]
    emitted[i] = max(emitted[i], len(safe))
    return delta
