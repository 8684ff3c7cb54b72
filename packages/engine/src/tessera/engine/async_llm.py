"""AsyncLLM: requests added from any task, outputs streamed through async iterators, the step
loop running in a worker thread so the event loop stays free.

Everything that touches the scheduler happens between steps: tasks only queue operations in an
inbox, which the loop applies before it starts the next step. Tokenization, chat templating and
grammar checks run in worker threads too, after an O(1) bound on the prompt's size, so no
request can hold the event loop for long.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tessera.sampling import SamplingParams

from .llm import LLM, PromptType
from .outputs import RequestOutput

logger = logging.getLogger(__name__)

# worker threads for tokenizing and templating: more would only compete with the engine's step
_PREPROCESS_THREADS = 2
# with KV transfers in flight and nothing to run, the loop looks at the connector this often (it
# also wakes at once when a transfer ends, where it can be told)
_KV_POLL_S = 0.25


class Prepared(msgspec.Struct, frozen=True):
    """A prompt tokenized and checked against the model: what ``generate`` runs."""

    text: str | None
    ids: list[int]
    mm: object = None  # llm.MultiModalInputs: a prompt's images (placeholder runs and pixels)


@dataclass
class _Track:
    send: MemoryObjectSendStream
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    itl: list[float] = field(default_factory=list)
    last: RequestOutput | None = None


class RequestStream:
    """The outputs of one request as it grows. ``close()`` (or leaving it unfinished and
    dropping it) aborts the request and frees its blocks at the next step boundary."""

    def __init__(self, llm: AsyncLLM, request_id: str, recv: MemoryObjectReceiveStream) -> None:
        self.request_id = request_id
        self._llm = llm
        self._recv = recv
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._recv.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._done = True
            raise StopAsyncIteration from None
        if out.finished:
            self._done = True
            self._recv.close()
        return out

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._recv.close()
            self._llm._submit(lambda: self._llm._abort(self.request_id))

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._llm._inbox.append(lambda: self._llm._abort(self.request_id))


class AsyncLLM:
    def __init__(self, llm: LLM, on_finish: Callable[[RequestOutput, _Track], None] | None = None) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.config.vocab_size
        # no token covers more characters than the longest vocabulary entry, so a text longer than
        # max_model_len times that can't fit the context: refused without tokenizing it
        longest = max((len(t) for t in self.tokenizer.hf.get_vocab(with_added_tokens=True)), default=1)
        self.max_prompt_chars = self.max_model_len * max(1, longest)
        self._inbox: deque[Callable[[], None]] = deque()
        self._tracks: dict[str, _Track] = {}
        self._queued_adds = 0
        self._wake = anyio.Event()
        self.on_finish = on_finish
        self.errored_steps = 0
        self._limiter = anyio.CapacityLimiter(_PREPROCESS_THREADS)
        self._grammar_lock = threading.Lock()
        self._token_text: dict[int, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """The step loop; run it in a task group for the life of the server."""
        connector = getattr(self.llm, "kv_connector", None)
        scheduler = self.llm.engine.scheduler
        if connector is not None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # another event loop: the connector is polled instead
                self._loop = None
            connector.notify = self._notify_from_thread
        while True:
            while self._inbox:
                self._inbox.popleft()()
            if connector is not None:
                scheduler.poll_kv_connector()  # frees released holds even while idle
            if not self.llm.has_unfinished_requests():
                await self._idle(connector)
                continue
            try:
                outputs = await anyio.to_thread.run_sync(self.llm.step)
            except Exception as e:
                logger.exception("engine step failed; its requests end with an error")
                self.errored_steps += 1
                self._fail_all(self.llm.engine.dead or f"{type(e).__name__}: {e}")
                continue
            now = time.monotonic()
            for out in outputs:
                self._deliver(out, now)
            if (
                connector is not None
                and not scheduler.num_scheduled_last_step
                and scheduler.kv_transfers_in_flight()
            ):
                await self._idle(connector)  # only KV transfers to wait for: don't spin

    async def _idle(self, connector) -> None:
        """Wait for something to do: an operation in the inbox, or news from the KV connector
        (polled every _KV_POLL_S while it has transfers or holds in flight)."""
        self._wake = anyio.Event()
        if self._inbox:
            return
        if connector is None or not self.llm.engine.scheduler.kv_transfers_in_flight():
            await self._wake.wait()
            return
        if connector.has_events():
            return
        with anyio.move_on_after(_KV_POLL_S):
            await self._wake.wait()

    def _notify_from_thread(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: self._wake.set())

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
        track.last = snapshot
        try:
            track.send.send_nowait(snapshot)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        if out.finished:
            self._close(out, track)

    def _close(self, out: RequestOutput, track: _Track) -> None:
        self._tracks.pop(out.request_id, None)
        track.send.close()
        if self.on_finish is not None:
            self.on_finish(out, track)

    def _fail_all(self, reason: str | None = None) -> None:
        for rid in list(self._tracks):
            self.llm.abort(rid)
            track = self._tracks[rid]
            failed = RequestOutput(
                request_id=rid, prompt=None, prompt_token_ids=[], finish_reason="error", stop_reason=reason
            )
            try:
                track.send.send_nowait(failed)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            self._close(failed, track)

    def _submit(self, op: Callable[[], None]) -> None:
        self._inbox.append(op)
        self._wake.set()

    # -- preparing requests (off the event loop) -------------------------------------------------

    def check_prompt_size(self, chars: int) -> None:
        """ValueError if a prompt of ``chars`` characters can't fit the context whatever its tokens."""
        if chars > self.max_prompt_chars:
            raise ValueError(
                f"the prompt has {chars} characters, more than can fit the maximum context length of "
                f"{self.max_model_len} tokens"
            )

    async def prepare(self, prompt: PromptType, params: SamplingParams) -> Prepared:
        """Tokenize and validate in a worker thread; raises ValueError naming the problem."""
        if isinstance(prompt, dict):
            inner = prompt.get("prompt", prompt.get("prompt_token_ids", ""))
            if isinstance(inner, str):
                self.check_prompt_size(len(inner))
        elif isinstance(prompt, str):
            self.check_prompt_size(len(prompt))
        elif len(prompt) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, more than the maximum context length of "
                f"{self.max_model_len}"
            )
        text, ids, mm = await anyio.to_thread.run_sync(
            self._prepare_sync, prompt, params, limiter=self._limiter
        )
        return Prepared(text, ids, mm)

    def _prepare_sync(self, prompt: PromptType, params: SamplingParams):
        if params.structured is not None:
            with self._grammar_lock:  # the compiler is built on first use
                self.llm.grammars()
        return self.llm._prepare(prompt, params)

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.check_prompt_size(len(text))
        return await anyio.to_thread.run_sync(
            lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens), limiter=self._limiter
        )

    async def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **context
    ) -> list[int]:
        """Token ids of chat messages through the model's template, rendered in a worker thread."""
        return await anyio.to_thread.run_sync(
            lambda: self.tokenizer.encode_chat(
                messages, add_generation_prompt=add_generation_prompt, **context
            ),
            limiter=self._limiter,
        )

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token: int) -> str:
        """The text of one token, special tokens included (cached: logprobs ask for many)."""
        text = self._token_text.get(token)
        if text is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            if len(self._token_text) < 1 << 18:
                self._token_text[token] = text
        return text

    # -- requests -----------------------------------------------------------------------------

    def num_waiting(self) -> int:
        """Requests admitted and not yet running: the scheduler's queue and adds not applied yet."""
        return self.llm.stats().num_waiting + self._queued_adds

    def num_unfinished(self) -> int:
        return len(self._tracks) + self._queued_adds

    def generate(
        self,
        prepared: Prepared,
        params: SamplingParams,
        *,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        kv_transfer=None,
    ) -> RequestStream:
        """Queue one prepared request now; its outputs come through the returned stream.
        ``kv_transfer``: its KVTransferParams in disaggregated serving."""
        text, ids, mm = prepared.text, prepared.ids, prepared.mm
        rid = request_id or uuid.uuid4().hex
        send, recv = anyio.create_memory_object_stream[RequestOutput](math.inf)
        track = _Track(send, time.monotonic())
        self._queued_adds += 1

        def add() -> None:
            self._queued_adds -= 1
            try:
                self.llm._add(
                    text, ids, params, priority=priority, cache_salt=cache_salt, request_id=rid, mm=mm,
                    kv_transfer=kv_transfer,
                )  # fmt: skip
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
        return RequestStream(self, rid, recv)

    def _abort(self, rid: str, *, tell: bool = False) -> None:
        track = self._tracks.pop(rid, None)
        self.llm.abort(rid)
        if track is None:
            return
        final = RequestOutput(request_id=rid, prompt=None, prompt_token_ids=[], finish_reason="abort")
        if track.last is not None:
            final = msgspec.structs.replace(
                track.last, finish_reason="abort", stop_reason=None, delta_text=""
            )
        if tell:
            try:
                track.send.send_nowait(final)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        track.send.close()
        if self.on_finish is not None:
            self.on_finish(final, track)

    def abort_all(self) -> None:
        """End every running request now (finish_reason "abort", with the text it has so far)."""

        def run() -> None:
            for rid in list(self._tracks):
                self._abort(rid, tell=True)

        self._submit(run)

    def stats(self):
        return self.llm.stats()
