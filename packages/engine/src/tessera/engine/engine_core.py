"""The step loop: schedule -> execute -> update."""

from __future__ import annotations

import logging
import time

from tessera.scheduler import EngineCoreOutput, Request, RequestStatus, Scheduler

from .model_runner import ModelRunner

logger = logging.getLogger(__name__)
SPEC_LOG_INTERVAL_S = 10.0


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self._spec_logged_at = time.monotonic()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str], status=RequestStatus.FINISHED_ABORTED) -> None:
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        so = self.scheduler.schedule()
        try:
            ro = self.runner.execute_model(so)
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
