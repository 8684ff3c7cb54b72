"""Request state machine and the continuous-batching step. No torch."""

from .config import SchedulerConfig
from .kv_transfer import KVConnector, KVConnectorEvents, KVTransferFailure, KVTransferParams
from .outputs import (
    NO_SAMPLING_PARAMS,
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    MultiModalFeature,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)
from .request import IllegalTransition, Request, RequestStatus, block_extra_keys
from .scheduler import Scheduler

__all__ = [
    "NO_SAMPLING_PARAMS",
    "CachedRequestData",
    "EngineCoreOutput",
    "IllegalTransition",
    "KVConnector",
    "KVConnectorEvents",
    "KVTransferFailure",
    "KVTransferParams",
    "ModelRunnerOutput",
    "MultiModalFeature",
    "NewRequestData",
    "Request",
    "RequestStatus",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "block_extra_keys",
]
