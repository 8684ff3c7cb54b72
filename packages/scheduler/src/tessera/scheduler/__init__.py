"""Request state machine and the continuous-batching step. No torch."""

from .config import SchedulerConfig
from .outputs import (
    NO_SAMPLING_PARAMS,
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)
from .request import IllegalTransition, Request, RequestStatus
from .scheduler import Scheduler

__all__ = [
    "NO_SAMPLING_PARAMS",
    "CachedRequestData",
    "EngineCoreOutput",
    "IllegalTransition",
    "ModelRunnerOutput",
    "NewRequestData",
    "Request",
    "RequestStatus",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
]
