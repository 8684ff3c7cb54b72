"""The step loop: schedule -> execute -> update."""

from __future__ import annotations

from tessera.scheduler import EngineCoreOutput, Request, RequestStatus, Scheduler

from .model_runner import ModelRunner


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner

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
        return self.scheduler.update_from_output(so, ro)
