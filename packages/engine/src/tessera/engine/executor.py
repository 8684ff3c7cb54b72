"""Executors: what ``EngineCore`` calls to run a step. It never calls a runner itself.

- ``UniprocExecutor``: the runner in this process (one rank: today's engine, the default).
- ``MultiprocExecutor``: one worker process per tensor-parallel rank (``worker.py``), started
  with ``spawn``, joined in a torch.distributed group (gloo on the CPU, NCCL on CUDA/ROCm). Each
  step's ``SchedulerOutput`` goes to every worker as msgspec bytes down its own pipe; rank 0
  answers with the ``ModelRunnerOutput``, the others with an empty reply. A worker that dies
  (killed, out of memory) or stops answering after another failed makes the executor dead:
  ``WorkerDiedError``, which ``EngineCore`` turns into failed requests and an unhealthy engine.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
import weakref
from multiprocessing.connection import wait

import msgspec

from tessera.scheduler import ModelRunnerOutput, SchedulerOutput

from .model_runner import ModelRunner
from .worker import (
    SHUTDOWN,
    RunnerPlan,
    StepReply,
    WorkerInit,
    WorkerLoaded,
    decode_runner_output,
    worker_main,
)

logger = logging.getLogger(__name__)

# after one rank reported an error, how long the others may take to report theirs; a rank still
# silent then is stuck in a collective its peer left: the group can't continue
ERROR_GRACE_S = 10.0
_THREAD_VARS = ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")


class WorkerDiedError(RuntimeError):
    """A worker process died or can no longer run steps; the executor is finished."""


class StepFailedError(RuntimeError):
    """Every rank raised in one step (as the in-process runner would have): the step's requests
    fail, the engine goes on."""


class Executor:
    runner: ModelRunner | None = None  # the in-process runner, where there is one
    world_size: int = 1

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        raise NotImplementedError

    def check_health(self) -> None:
        """Raises ``WorkerDiedError`` if a worker is gone."""

    def shutdown(self) -> None:
        pass


class UniprocExecutor(Executor):
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(so)


class MultiprocExecutor(Executor):
    """``world_size`` worker processes. Construction starts them and waits for phase one (each
    loaded its weights): ``loaded`` holds their reports; ``start_runners(plan)`` is phase two."""

    def __init__(
        self,
        engine_args: dict,
        world_size: int,
        device: str,
        dtype: str,
        threads: int,
        *,
        backend: str | None = None,
        start_timeout: float | None = None,
    ) -> None:
        self.world_size = world_size
        self.error: str | None = None
        backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.procs: list[mp.Process] = []
        self.conns = []
        # each worker's thread pools (torch's OpenMP, Numba's) get its share of the cores: pools
        # sized for the whole machine in every rank starve each other. Read at the child's start.
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: str(threads) for k in _THREAD_VARS})
        for rank in range(world_size):
            dev = f"cuda:{rank}" if device == "cuda" else device
            init = WorkerInit(engine_args, rank, world_size, init_method, backend, dev, dtype, threads)
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(
                target=worker_main,
                args=(msgspec.msgpack.encode(init), child),
                name=f"tessera-worker-{rank}",
                daemon=True,
            )
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        logger.info(
            "started %d worker processes (%s, %s): pids %s",
            world_size, backend, device, [p.pid for p in self.procs],
        )  # fmt: skip
        try:
            replies = self._collect(start_timeout, what="loading the model")
            errors = [e for e in map(_error_of, replies) if e is not None]
            if errors:
                raise WorkerDiedError("; ".join(errors))
            self.loaded = [msgspec.msgpack.decode(r, type=WorkerLoaded) for r in replies]
        except BaseException:
            self.shutdown()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start_runners(self, plan: RunnerPlan, timeout: float | None = None) -> None:
        self._send(msgspec.msgpack.encode(plan))
        try:
            for r in self._collect(timeout, what="building the runners"):
                reply = msgspec.msgpack.decode(r, type=StepReply)
                if reply.error:
                    raise WorkerDiedError(reply.error)
        except BaseException:
            self.shutdown()
            raise

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._send(msgspec.msgpack.encode(so))
        replies = [msgspec.msgpack.decode(r, type=StepReply) for r in self._collect(None, what="a step")]
        errors = [f"rank {i}: {r.error}" for i, r in enumerate(replies) if r.error]
        if errors:
            raise StepFailedError("; ".join(errors))
        if not replies[0].has_output:
            raise WorkerDiedError("rank 0 answered a step without its output")
        return decode_runner_output(replies[0].output)

    def check_health(self) -> None:
        """Reads only (safe beside a running step): the step itself notices a death and stops
        the rest."""
        if self.error is not None:
            raise WorkerDiedError(self.error)
        for rank, p in enumerate(self.procs):
            if not p.is_alive():
                raise WorkerDiedError(f"worker rank {rank} (pid {p.pid}) {_exit_text(p.exitcode)}")

    def shutdown(self) -> None:
        self._finalizer()

    # -- the pipes --------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self.check_health()
        except WorkerDiedError as e:
            self._die(str(e))
        for rank, c in enumerate(self.conns):
            try:
                c.send_bytes(data)
            except (BrokenPipeError, OSError) as e:
                self._die(f"worker rank {rank} (pid {self.procs[rank].pid}) is unreachable: {e}")

    def _collect(self, timeout: float | None, what: str) -> list[bytes]:
        """One reply from every rank, in rank order. A process that exits first, a rank silent
        for ``ERROR_GRACE_S`` after another reported an error, or ``timeout``: the executor dies."""
        replies: dict[int, bytes] = {}
        pending = {c: rank for rank, c in enumerate(self.conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs)}
        start = time.monotonic()
        errored_at = None
        while pending:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if errored_at is not None:
                grace = ERROR_GRACE_S - (time.monotonic() - errored_at)
                left = grace if left is None else min(left, grace)
            if left is not None and left <= 0:
                silent = sorted(pending.values())
                self._die(f"worker ranks {silent} did not answer while {what}")
            ready = wait([*pending, *sentinels], left)
            for obj in ready:  # replies first: a worker may answer and then exit
                rank = pending.pop(obj, None)
                if rank is None:
                    continue
                try:
                    data = obj.recv_bytes()
                except (EOFError, OSError):
                    p = self.procs[rank]
                    p.join(1.0)
                    self._die(f"worker rank {rank} (pid {p.pid}) {_exit_text(p.exitcode)} while {what}")
                replies[rank] = data
                if errored_at is None and _error_of(data) is not None:
                    errored_at = time.monotonic()
            for obj in ready:
                rank = sentinels.get(obj)
                if rank is not None and self.conns[rank] in pending:
                    p = self.procs[rank]
                    p.join(1.0)
                    self._die(f"worker rank {rank} (pid {p.pid}) {_exit_text(p.exitcode)} while {what}")
        return [replies[r] for r in range(len(self.conns))]

    def _die(self, message: str):
        if self.error is None:
            self.error = message
            logger.error("tensor-parallel executor failed: %s", message)
        self.shutdown()
        raise WorkerDiedError(self.error)


class _MaybeError(msgspec.Struct):
    error: str | None = None


_decode_error = msgspec.msgpack.Decoder(_MaybeError).decode


def _error_of(reply: bytes) -> str | None:
    """The error a worker's reply carries (any reply is a map; other fields are skipped)."""
    return _decode_error(reply).error


def _stop(procs, conns, timeout: float = 5.0) -> None:
    """Shut the workers down: a Shutdown message, then SIGTERM, then SIGKILL."""
    for c in conns:
        try:
            c.send_bytes(SHUTDOWN)
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for c in conns:
        c.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- launched by torchrun: every process is a rank ---------------------------------------------


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun (or another launcher that
    sets torch.distributed's environment), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


class ControlChannel:
    """Bytes from rank 0 to every rank over a gloo group (on GPUs too: the NCCL group carries the
    model's collectives, this one the engine's messages): a length, then the bytes."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo")

    def broadcast(self, data: bytes | None = None) -> bytes:
        import torch
        import torch.distributed as dist

        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        n = int(size.item())
        buf = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data is not None and n
            else torch.empty(n, dtype=torch.uint8)
        )
        if n:
            dist.broadcast(buf, 0, group=self.group)
        return data if data is not None else buf.numpy().tobytes()


class TorchrunExecutor(Executor):
    """Rank 0 of a torchrun launch: the engine core and rank 0's runner live here; each step's
    ``SchedulerOutput`` goes to the other ranks (``serve_torchrun_steps``) through the control
    channel. The ranks can't be re-synchronised after a failed collective, so any failure of a
    step ends the engine (``WorkerDiedError``)."""

    def __init__(self, runner: ModelRunner, channel: ControlChannel, world_size: int) -> None:
        self.runner, self.channel, self.world_size = runner, channel, world_size
        self.error: str | None = None
        self._stopped = False
        atexit.register(self.shutdown)  # the other ranks wait for word from this one

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        if self.error is not None:
            raise WorkerDiedError(self.error)
        try:
            self.channel.broadcast(msgspec.msgpack.encode(so))
            return self.runner.execute_model(so)
        except Exception as e:
            self.error = f"a tensor-parallel step failed across the torchrun ranks: {type(e).__name__}: {e}"
            logger.error("%s", self.error)
            raise WorkerDiedError(self.error) from e

    def check_health(self) -> None:
        if self.error is not None:
            raise WorkerDiedError(self.error)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self._stopped:
            return
        self._stopped = True
        if self.error is None:
            try:
                self.channel.broadcast(SHUTDOWN)
            except Exception:  # a rank already gone: nothing to tell it
                pass
        if dist.is_initialized():
            dist.destroy_process_group()


def serve_torchrun_steps(runner: ModelRunner, channel: ControlChannel, rank: int) -> None:
    """Ranks 1.. of a torchrun launch: run each step rank 0 broadcasts, until it says stop."""
    import torch.distributed as dist

    while True:
        try:
            data = channel.broadcast()
        except Exception as e:  # rank 0 is gone
            logger.error("rank %d: rank 0 is gone (%s); exiting", rank, e)
            return
        if data == SHUTDOWN:
            break
        runner.execute_model(msgspec.msgpack.decode(data, type=SchedulerOutput))
    dist.destroy_process_group()
