"""AsyncLLM: requests added from any task, outputs streamed through async iterators, the step
loop running in a worker thread so the event loop stays free.

Everything that touches the scheduler happens between steps: tasks only queue operations in an
inbox, which the loop applies before it starts the next step.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from tessera.sampling import SamplingParams

from .llm import LLM, PromptType
from .outputs import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Track:
    send: MemoryObjectSendStream
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    itl: list[float] = field(default_factory=list)


class AsyncLLM:
    def __init__(self, llm: LLM, on_finish: Callable[[RequestOutput, _Track], None] | None = None) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self._inbox: deque[Callable[[], None]] = deque()
        self._tracks: dict[str, _Track] = {}
        self._wake = anyio.Event()
        self._on_finish = on_finish
        self.errored_steps = 0

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """The step loop; run it in a task group for the life of the server."""
        while True:
            while self._inbox:
                self._inbox.popleft()()
            if not self.llm.has_unfinished_requests():
                self._wake = anyio.Event()
                if not self._inbox:
                    await self._wake.wait()
                continue
            try:
                outputs = await anyio.to_thread.run_sync(self.llm.step)
            except Exception:
                logger.exception("engine step failed; its requests end with an error")
                self.errored_steps += 1
                self._fail_all()
                continue
            now = time.monotonic()
            for out in outputs:
                self._deliver(out, now)

    def _deliver(self, out: RequestOutput, now: float) -> None:
        track = self._tracks.get(out.request_id)
        if track is None:
            return
        if out.token_ids:
            if track.first_token is None:
                track.first_token = now
            elif track.last_token is not None:
                track.itl.append(now - track.last_token)
            track.last_token = now
        # a copy: the stream consumer may read it after later steps changed the original
        snapshot = msgspec.structs.replace(out, token_ids=list(out.token_ids))
        try:
            track.send.send_nowait(snapshot)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        if out.finished:
            self._close(out, track)

    def _close(self, out: RequestOutput, track: _Track) -> None:
        self._tracks.pop(out.request_id, None)
        track.send.close()
        if self._on_finish is not None:
            self._on_finish(out, track)

    def _fail_all(self) -> None:
        for rid in list(self._tracks):
            self.llm.abort(rid)
            track = self._tracks[rid]
            failed = RequestOutput(request_id=rid, prompt=None, prompt_token_ids=[], finish_reason="error")
            try:
                track.send.send_nowait(failed)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            self._close(failed, track)

    def _submit(self, op: Callable[[], None]) -> None:
        self._inbox.append(op)
        self._wake.set()

    # -- requests -----------------------------------------------------------------------------

    def prepare(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and validate; raises ValueError naming the problem. Changes nothing."""
        return self.llm._prepare(prompt, params)

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        prepared: tuple[str | None, list[int]] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it grows; leaving the iteration early aborts it and frees
        its blocks at the next step boundary."""
        text, ids = prepared or self.prepare(prompt, params)
        rid = request_id or uuid.uuid4().hex
        send, recv = anyio.create_memory_object_stream[RequestOutput](math.inf)
        track = _Track(send, time.monotonic())

        def add() -> None:
            try:
                self.llm._add(text, ids, params, priority=priority, cache_salt=cache_salt, request_id=rid)
            except Exception as e:  # refused by the scheduler: say so on the stream
                failed = RequestOutput(
                    request_id=rid,
                    prompt=text,
                    prompt_token_ids=ids,
                    finish_reason="error",
                    stop_reason=str(e),
                )
                send.send_nowait(failed)
                send.close()
                return
            self._tracks[rid] = track

        self._submit(add)
        finished = False
        try:
            async with recv:
                async for out in recv:
                    finished = out.finished
                    yield out
                    if finished:
                        return
        finally:
            if not finished:
                self._submit(lambda: self._abort(rid))

    def _abort(self, rid: str) -> None:
        track = self._tracks.pop(rid, None)
        self.llm.abort(rid)
        if track is not None:
            track.send.close()
            if self._on_finish is not None:
                self._on_finish(
                    RequestOutput(request_id=rid, prompt=None, prompt_token_ids=[], finish_reason="abort"),
                    track,
                )

    def stats(self):
        return self.llm.stats()
