"""The step loop: schedule -> execute (through an executor) -> update."""

from __future__ import annotations

import logging
import time

from tessera.scheduler import EngineCoreOutput, Request, RequestStatus, Scheduler

from .executor import Executor, StepFailedError, UniprocExecutor, WorkerDiedError
from .model_runner import ModelRunner

logger = logging.getLogger(__name__)
SPEC_LOG_INTERVAL_S = 10.0


class EngineDeadError(RuntimeError):
    """The engine can run no more steps: a worker process died. Every request it held ended with
    an error; new ones are refused."""


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor | ModelRunner) -> None:
        self.scheduler = scheduler
        self.executor = executor if isinstance(executor, Executor) else UniprocExecutor(executor)
        self.dead: str | None = None  # why the engine can't go on, once it can't
        self._spec_logged_at = time.monotonic()

    @property
    def runner(self) -> ModelRunner | None:
        """The in-process runner (None when the ranks run in worker processes)."""
        return self.executor.runner

    def check_health(self) -> None:
        """Raises ``EngineDeadError`` if the engine can't run steps (a worker died, even between
        steps): its requests are failed and their blocks freed here."""
        if self.dead is None:
            try:
                self.executor.check_health()
            except WorkerDiedError as e:
                self._die(str(e))
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def health(self) -> str | None:
        """Why the engine can't run steps, or None; reads only (safe beside a running step)."""
        if self.dead is not None:
            return self.dead
        try:
            self.executor.check_health()
        except WorkerDiedError as e:
            return f"the engine stopped: {e}"
        return None

    def _die(self, reason: str) -> None:
        self.dead = f"the engine stopped: {reason}"
        self.scheduler.finish_requests(list(self.scheduler.requests), RequestStatus.FINISHED_ERROR)
        self.scheduler.reset_prefix_cache()
        self.executor.shutdown()

    def shutdown(self) -> None:
        self.executor.shutdown()

    def add_request(self, request: Request) -> None:
        self.check_health()
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str], status=RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        so = self.scheduler.schedule()
        try:
            ro = self.executor.execute_model(so)
        except WorkerDiedError as e:
            # every request ends in error and gives its blocks back; the engine takes no more
            self._die(str(e))
            raise EngineDeadError(self.dead) from e
        except StepFailedError:
            self.scheduler.finish_requests(list(so.num_scheduled_tokens), RequestStatus.FINISHED_ERROR)
            self.scheduler.reset_prefix_cache()
            raise
        except BaseException:
            # The step's requests end in error and give their blocks back. Blocks registered in
            # the prefix cache for this step were never written: forget every hash.
            self.scheduler.finish_requests(list(so.num_scheduled_tokens), RequestStatus.FINISHED_ERROR)
            self.scheduler.reset_prefix_cache()
            raise
        outputs = self.scheduler.update_from_output(so, ro)
        if so.scheduled_spec_tokens and time.monotonic() - self._spec_logged_at > SPEC_LOG_INTERVAL_S:
            self._log_spec_stats()
        return outputs

    def _log_spec_stats(self) -> None:
        self._spec_logged_at = time.monotonic()
        s = self.scheduler.stats()
        logger.info(
            "speculative decoding: acceptance %.1f%%, mean accepted length %.2f, %.1f%% of steps "
            "speculated (%d drafts, %d of %d tokens accepted)",
            100 * s.spec_acceptance_rate, s.spec_mean_accepted_length, 100 * s.spec_step_share,
            s.spec_num_drafts, s.spec_num_accepted_tokens, s.spec_num_draft_tokens,
        )  # fmt: skip
