"""TCPConnector: moves a prompt's KV blocks from a producer engine to a consumer engine over TCP
(vLLM's NixlConnector flow, where there is no NIXL: the consumer pulls, the producer serves).

Producer: a request with ``do_remote_decode`` computes its prompt and one token; when it finishes,
the scheduler keeps the prompt's blocks (allocated, so never reused or evicted) and this connector
holds them for a consumer, answering with where to pull them from. A server thread answers "send
blocks i..j of request R", streams them straight from the pages, then releases the hold; a hold
nobody pulls is released after ``kv_hold_timeout`` seconds.

Consumer: a request with ``do_remote_prefill`` gets its blocks (prefix-cache hits first) and waits
while a pull thread writes the missing ones into the pages, chunk by chunk as they arrive; the
scheduler runs it once they all have. A producer that vanishes or stalls fails the request (its
blocks are freed, never hashed).

Every scheduler-side call comes from the engine's thread; the threads here only touch the pages
of blocks the scheduler has handed over, and report through :meth:`poll`.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import torch

from tessera.scheduler import KVConnectorEvents, KVTransferFailure, KVTransferParams, Request

from .kv_pages import KVPages
from .kv_transfer_config import KVTransferConfig
from .kv_wire import PullReply, PullRequest, read_frame, recv_into_exact, write_frame

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 4 << 20  # a pull's buffer: blocks per chunk on the wire
_PULL_THREADS = 4
_ACCEPT_POLL_S = 0.5


def prompt_hash(token_ids: Sequence[int]) -> str:
    """A prompt's token ids as the producer and the consumer both hash them."""
    a = array("I", token_ids)
    if sys.byteorder == "big":
        a.byteswap()
    return hashlib.sha256(a.tobytes()).hexdigest()[:32]


class _Refused(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class _Hold:
    block_ids: list[int]
    prompt_hash: str
    deadline: float
    in_use: bool = False


@dataclass
class KVTransferStats:
    blocks_sent: int = 0
    bytes_sent: int = 0
    blocks_received: int = 0
    bytes_received: int = 0
    pulls_failed: int = 0  # consumer: pulls that ended a request with an error
    holds_expired: int = 0  # producer: holds no consumer pulled in time
    num_held: int = 0  # producer: holds now


class TCPConnector:
    name = "TCPConnector"

    def __init__(self, config: KVTransferConfig, pages: KVPages) -> None:
        self.config = config
        self.pages = pages
        self.stats = KVTransferStats()
        self.notify: Callable[[], None] | None = None  # wakes an idle engine loop (any thread)
        self.chunk_blocks = max(1, _CHUNK_BYTES // pages.layout.block_nbytes)
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold] = {}
        self._loads: dict[str, threading.Event] = {}  # request id -> its cancel flag
        self._events = KVConnectorEvents(loaded=[], failed={}, released=[])
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(_PULL_THREADS, "kv-pull") if config.is_consumer else None
        self._server: socket.socket | None = None
        self.host, self.port = config.kv_ip, config.kv_port
        if config.is_producer:
            try:
                self._server = socket.create_server((config.kv_ip, config.kv_port))
            except OSError as e:
                raise ValueError(
                    f"kv_transfer_config: the producer cannot listen on {config.kv_ip}:{config.kv_port} "
                    f"({e.strerror or e})"
                ) from None
            self._server.settimeout(_ACCEPT_POLL_S)
            self.port = self._server.getsockname()[1]
            if config.kv_ip in ("0.0.0.0", "::", ""):
                self.host = socket.gethostname()  # what a consumer elsewhere can reach
            threading.Thread(target=self._accept_loop, name="kv-server", daemon=True).start()

    # -- the scheduler's side ----------------------------------------------------------------------

    def request_finished(self, request: Request, block_ids: list[int]) -> KVTransferParams | None:
        if not self.config.is_producer or self._closed.is_set():
            return None
        rid = request.request_id
        h = prompt_hash(request.prompt_token_ids)
        with self._lock:
            self._holds[rid] = _Hold(list(block_ids), h, time.monotonic() + self.config.kv_hold_timeout)
            self.stats.num_held = len(self._holds)
        return KVTransferParams(
            do_remote_prefill=True,
            remote_host=self.host,
            remote_port=self.port,
            remote_request_id=rid,
            remote_block_ids=list(block_ids),
            prompt_hash=h,
            first_token_ids=list(request.output_token_ids),
        )

    def start_load(self, request: Request, block_ids: list[int], first_block: int) -> None:
        cancel = threading.Event()
        with self._lock:
            self._loads[request.request_id] = cancel
        self._pool.submit(self._pull, request.request_id, request.kv_transfer, block_ids, first_block, cancel)

    def cancel_load(self, request_id: str) -> None:
        with self._lock:
            cancel = self._loads.get(request_id)
        if cancel is not None:
            cancel.set()

    def poll(self) -> KVConnectorEvents:
        now = time.monotonic()
        with self._lock:
            for rid, hold in list(self._holds.items()):
                if not hold.in_use and now > hold.deadline:
                    del self._holds[rid]
                    self._events.released.append(rid)
                    self.stats.holds_expired += 1
                    logger.warning("KV blocks of request %s were not pulled within %.0f s: freed", rid,
                                   self.config.kv_hold_timeout)  # fmt: skip
            self.stats.num_held = len(self._holds)
            events, self._events = self._events, KVConnectorEvents(loaded=[], failed={}, released=[])
        return events

    def has_events(self) -> bool:
        with self._lock:
            return bool(self._events.loaded or self._events.failed or self._events.released)

    def release(self, request_id: str) -> None:
        """Give up a hold now (its request's answer will not send a consumer); a no-op for one
        being pulled or already gone."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.in_use:
                return
            del self._holds[request_id]
            self._events.released.append(request_id)
        self._notify()

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            self._server.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _notify(self) -> None:
        if self.notify is not None:
            try:
                self.notify()
            except Exception:  # the loop is gone (shutting down): polling still finds the events
                logger.debug("kv connector: notify failed", exc_info=True)

    # -- producer: the block server -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="kv-send", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.config.kv_transfer_timeout)
            try:
                req = read_frame(conn, PullRequest, "a pull request")
            except (OSError, ValueError, msgspec.DecodeError) as e:
                logger.warning("kv server: a malformed pull request: %s", e)
                return
            hold, refusal = self._claim(req)
            if refusal is not None:
                try:
                    write_frame(conn, refusal)
                except OSError:
                    pass
                return
            try:
                write_frame(conn, PullReply())
                ids = hold.block_ids[req.first_block : req.first_block + req.num_blocks]
                for i in range(0, len(ids), req.chunk_blocks):
                    chunk = ids[i : i + req.chunk_blocks]
                    for part in self.pages.read(chunk):
                        conn.sendall(part)
                    with self._lock:
                        self.stats.blocks_sent += len(chunk)
                        self.stats.bytes_sent += len(chunk) * self.pages.layout.block_nbytes
            except OSError as e:
                logger.warning("kv server: sending request %s's blocks failed: %s", req.request_id, e)
            finally:
                # pulled, or its consumer is gone: nobody else will pull these blocks
                with self._lock:
                    self._holds.pop(req.request_id, None)
                    self._events.released.append(req.request_id)
                    self.stats.num_held = len(self._holds)
                self._notify()

    def _claim(self, req: PullRequest) -> tuple[_Hold | None, PullReply | None]:
        with self._lock:
            hold = self._holds.get(req.request_id)
            if hold is None:
                return None, PullReply(
                    error=f"no KV blocks are held for request {req.request_id!r} (never held here, already "
                    f"pulled, or not pulled within kv_hold_timeout, {self.config.kv_hold_timeout:g} s)"
                )
            mine = self.pages.layout
            if req.layout != mine:
                why = f"this producer's KV cache is {mine.describe()}, the consumer's {req.layout.describe()}"
                return None, PullReply(error=why, retryable=False)
            if req.prompt_hash != hold.prompt_hash:
                return None, PullReply(
                    error=f"request {req.request_id!r} computed another prompt (its hash differs)",
                    retryable=False,
                )
            if not (0 <= req.first_block and 0 <= req.num_blocks and req.chunk_blocks > 0) or (
                req.first_block + req.num_blocks > len(hold.block_ids)
            ):
                last = req.first_block + req.num_blocks - 1
                return None, PullReply(
                    error=f"blocks {req.first_block}..{last} are not among the {len(hold.block_ids)} held "
                    f"for request {req.request_id!r}",
                    retryable=False,
                )
            if hold.in_use:
                return None, PullReply(
                    error=f"request {req.request_id!r} is already being pulled", retryable=False
                )
            hold.in_use = True
            return hold, None

    # -- consumer: pulls ---------------------------------------------------------------------------

    def _pull(
        self, rid: str, kvt: KVTransferParams, block_ids: list[int], first_block: int, cancel: threading.Event
    ) -> None:
        failure = None
        where = f"{kvt.remote_host}:{kvt.remote_port}"
        try:
            self._fetch(kvt, block_ids, first_block, cancel)
        except _Refused as e:
            failure = KVTransferFailure(str(e), e.retryable)
        except (OSError, ValueError, msgspec.DecodeError) as e:
            failure = KVTransferFailure(
                f"pulling the prompt's KV blocks from the producer at {where} failed: {_why(e)}"
            )
        except Exception as e:  # a bug of ours: still an error for this request only
            logger.exception("kv pull of request %s failed", rid)
            failure = KVTransferFailure(f"pulling the prompt's KV blocks failed: {type(e).__name__}: {e}")
        if failure is not None and not block_ids:
            failure = None  # only a release was asked for: the producer's timeout frees its hold
        with self._lock:
            self._loads.pop(rid, None)
            if failure is None:
                self._events.loaded.append(rid)
            else:
                self._events.failed[rid] = failure
                self.stats.pulls_failed += 1
        if failure is not None:
            logger.warning("request %s: %s", rid, failure.message)
        self._notify()

    def _fetch(self, kvt: KVTransferParams, block_ids: list[int], first_block: int, cancel) -> None:
        timeout = self.config.kv_transfer_timeout
        nbytes = self.pages.layout.block_nbytes
        with socket.create_connection((kvt.remote_host, kvt.remote_port), timeout=timeout) as s:
            s.settimeout(timeout)
            request = PullRequest(
                request_id=kvt.remote_request_id,
                prompt_hash=kvt.prompt_hash,
                first_block=first_block,
                num_blocks=len(block_ids),
                chunk_blocks=self.chunk_blocks,
                layout=self.pages.layout,
            )
            write_frame(s, request)
            reply = read_frame(s, PullReply, "the producer's answer")
            if reply.error is not None:
                where = f"{kvt.remote_host}:{kvt.remote_port}"
                raise _Refused(f"the producer at {where} refused the pull: {reply.error}", reply.retryable)
            buf = torch.empty(min(len(block_ids), self.chunk_blocks) * nbytes, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            for i in range(0, len(block_ids), self.chunk_blocks):
                if cancel.is_set():
                    raise _Refused("the request was aborted during its pull", True)
                chunk = block_ids[i : i + self.chunk_blocks]
                size = len(chunk) * nbytes
                last = first_block + i + len(chunk) - 1
                recv_into_exact(s, view[:size], f"the prompt's blocks {first_block + i}..{last}")
                self.pages.write(chunk, buf[:size])
                with self._lock:
                    self.stats.blocks_received += len(chunk)
                    self.stats.bytes_received += size


def _why(e: Exception) -> str:
    if isinstance(e, TimeoutError):
        return "it did not answer in time (kv_transfer_timeout)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is it running?)"
    return str(e) or type(e).__name__


def make_kv_connector(config: KVTransferConfig | None, llm) -> TCPConnector | None:
    """The connector ``config`` names, over the in-process runner's KV pages, attached to the
    engine's scheduler; ValueError for an engine it cannot serve."""
    if config is None:
        return None
    runner = llm.engine.runner
    if getattr(llm, "draft_model", None) is not None:
        raise ValueError(
            "kv_transfer_config: disaggregated serving with a draft model is not supported (the draft's "
            "K/V would have to move too); use the n-gram proposer or none"
        )
    if getattr(llm, "multimodal", None) is not None:
        raise ValueError("kv_transfer_config: disaggregated serving takes text-only models")
    if getattr(runner, "num_groups", 1) != 1:
        raise ValueError(
            f"kv_transfer_config: disaggregated serving needs one KV cache group (full attention in every "
            f"layer); this model has {runner.num_groups} (sliding-window layers)"
        )
    if not hasattr(runner, "kv_caches"):
        raise ValueError("kv_transfer_config: disaggregated serving needs the in-process runner's KV cache")
    connector = TCPConnector(config, KVPages(runner.kv_caches))
    llm.engine.scheduler.connector = connector
    if config.is_producer:
        logger.info("KV producer: serving held blocks on %s:%d", connector.host, connector.port)
    return connector


def check_kv_transfer(
    connector: TCPConnector | None, ids: list[int], params, kvt: KVTransferParams, vocab_size: int
) -> None:
    """ValueError naming what makes ``kv_transfer_params`` unusable for this prompt on this engine."""
    if not (kvt.do_remote_decode or kvt.do_remote_prefill):
        return
    if connector is None:
        raise ValueError(
            "kv_transfer_params: this server takes no part in disaggregated serving (start it with "
            "--kv-transfer-config)"
        )
    role = connector.config.kv_role
    if kvt.do_remote_decode and kvt.do_remote_prefill:
        raise ValueError("kv_transfer_params: do_remote_decode and do_remote_prefill exclude each other")
    if params.n != 1:
        raise ValueError("kv_transfer_params: a disaggregated request has one choice (n = 1)")
    if params.prompt_logprobs is not None:
        raise ValueError("kv_transfer_params: prompt logprobs need the prompt computed here")
    if kvt.do_remote_decode:
        if not connector.config.is_producer:
            raise ValueError(
                f"kv_transfer_params.do_remote_decode: this server is a {role}, not a KV producer"
            )
        if params.max_tokens != 1:
            raise ValueError(
                "kv_transfer_params.do_remote_decode: a producer computes the prompt and one token, so "
                f"max_tokens must be 1, got {params.max_tokens}"
            )
        return
    if not connector.config.is_consumer:
        raise ValueError(f"kv_transfer_params.do_remote_prefill: this server is a {role}, not a KV consumer")
    missing = [
        f
        for f in ("remote_host", "remote_port", "remote_request_id", "prompt_hash")
        if getattr(kvt, f) is None
    ]
    if missing:
        raise ValueError(
            f"kv_transfer_params.do_remote_prefill needs {', '.join(missing)} (the producer's answer "
            "has them)"
        )
    if not kvt.first_token_ids:
        raise ValueError("kv_transfer_params.first_token_ids: the token(s) the producer sampled are missing")
    if not all(0 <= t < vocab_size for t in kvt.first_token_ids):
        raise ValueError(
            f"kv_transfer_params.first_token_ids: a token id is outside the vocabulary (0..{vocab_size - 1})"
        )
    if params.logprobs is not None:
        raise ValueError(
            "kv_transfer_params.do_remote_prefill: logprobs of the producer's token are not available"
        )
    if kvt.prompt_hash != prompt_hash(ids):
        raise ValueError(
            "kv_transfer_params.prompt_hash does not match this prompt's tokens: the producer computed "
            "another prompt (a different model, chat template or request body?)"
        )
