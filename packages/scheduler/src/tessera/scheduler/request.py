"""A request as the scheduler sees it: token counts, stop fields, and a state machine."""

from __future__ import annotations

import enum

import msgspec

from .kv_transfer import KVTransferParams
from .outputs import NO_SAMPLING_PARAMS, MultiModalFeature


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6
    # a disaggregated consumer's request: its blocks are allocated and its prompt's K/V is being
    # pulled from the producer; it runs (from the end of its prompt) once they have all arrived
    WAITING_FOR_REMOTE_KVS = 7

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}

_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}
_ALLOWED: dict[RequestStatus, set[RequestStatus]] = {
    RequestStatus.WAITING: {
        RequestStatus.RUNNING,
        RequestStatus.WAITING_FOR_REMOTE_KVS,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    },
    # it may finish without running: the producer's first token may already end it
    RequestStatus.WAITING_FOR_REMOTE_KVS: {RequestStatus.RUNNING} | _FINISHED,
    RequestStatus.RUNNING: {RequestStatus.PREEMPTED} | _FINISHED,
    RequestStatus.PREEMPTED: {
        RequestStatus.RUNNING,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    },
}


class IllegalTransition(RuntimeError):
    pass


class Request:
    """``num_computed_tokens`` catches up with ``num_tokens``: prefill, chunked prefill and
    decode are one mechanism."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        *,
        max_tokens: int,
        min_tokens: int = 0,
        stop_token_ids: tuple[int, ...] | list[int] = (),
        eos_token_ids: tuple[int, ...] | list[int] = (),
        ignore_eos: bool = False,
        sampling_params: msgspec.Raw | bytes = NO_SAMPLING_PARAMS,
        arrival_time: float = 0.0,
        priority: int = 0,
        cache_salt: str | None = None,
        skip_prefix_cache: bool = False,
        mm_features: list[MultiModalFeature] | tuple[MultiModalFeature, ...] = (),
        kv_transfer: KVTransferParams | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: the prompt is empty")
        _check_features(request_id, mm_features, len(prompt_token_ids))
        if max_tokens < 1:
            raise ValueError(f"request {request_id}: max_tokens must be at least 1, got {max_tokens}")
        if kv_transfer is not None and kv_transfer.do_remote_prefill and not kv_transfer.first_token_ids:
            raise ValueError(
                f"request {request_id}: a remote prefill needs the token(s) the producer sampled "
                "(kv_transfer_params.first_token_ids)"
            )
        if isinstance(sampling_params, bytes):
            sampling_params = msgspec.Raw(sampling_params)
        if not isinstance(sampling_params, msgspec.Raw):
            raise TypeError(
                f"request {request_id}: sampling_params must be msgpack bytes (msgspec.Raw or bytes, "
                f"e.g. msgspec.msgpack.encode(params)), got {type(sampling_params).__name__}"
            )
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)  # prompt + output, kept in step
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.ignore_eos = ignore_eos
        # msgpack bytes, opaque: passed to the model runner untouched
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time
        self.priority = priority  # lower runs first under the priority policy
        self.cache_salt = cache_salt
        # compute every prompt token even if cached (e.g. their logprobs are wanted)
        self.skip_prefix_cache = skip_prefix_cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # draft tokens proposed after the last sampled token, verified when next scheduled
        self.spec_token_ids: list[int] = []
        self.seq = 0  # admission order, set by the scheduler
        # the prompt's images by offset, and which of them the runner has encoded since the
        # request last started running (a preempted request's runner state is gone)
        self.mm_features = list(mm_features)
        self.encoded: set[int] = set()
        # disaggregated serving: see kv_transfer.py. A consumer's request pulls its prompt's
        # blocks once (then it is an ordinary request: preempted, it recomputes); a producer's
        # answer carries ``kv_transfer_result``, where a consumer may pull them from
        self.kv_transfer = kv_transfer
        self.needs_remote_kvs = kv_transfer is not None and kv_transfer.do_remote_prefill
        self.kv_transfer_result: KVTransferParams | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def append_output_token(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.all_token_ids.append(token)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def transition(self, new: RequestStatus) -> None:
        if new not in _ALLOWED.get(self.status, set()):
            raise IllegalTransition(
                f"request {self.request_id}: {self.status.name} -> {new.name} is not allowed"
            )
        self.status = new

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, computed={self.num_computed_tokens}, "
            f"tokens={self.num_tokens})"
        )


def _check_features(request_id: str, features, num_prompt_tokens: int) -> None:
    """Placeholder runs inside the prompt, in order, not overlapping."""
    end = 0
    for i, f in enumerate(features):
        if not isinstance(f, MultiModalFeature):
            raise TypeError(
                f"request {request_id}: mm_features[{i}] is a {type(f).__name__}, not a MultiModalFeature"
            )
        if f.length < 1 or f.offset < end or f.offset + f.length > num_prompt_tokens:
            raise ValueError(
                f"request {request_id}: mm_features[{i}] covers prompt tokens {f.offset}.."
                f"{f.offset + f.length - 1}, which must be non-empty, inside the {num_prompt_tokens}-token "
                f"prompt, after the previous input's (ending at {end - 1}) and in order"
            )
        end = f.offset + f.length


def block_extra_keys(features, num_tokens: int, block_size: int) -> list[tuple | None] | None:
    """Per block of the first ``num_tokens`` tokens, the identifiers of the inputs whose
    placeholders it overlaps (None: none), for the prefix-cache hash; None without inputs."""
    if not features:
        return None
    keys: list[tuple | None] = [None] * (-(-num_tokens // block_size))
    for f in features:
        for b in range(f.offset // block_size, (f.offset + f.length - 1) // block_size + 1):
            keys[b] = (*(keys[b] or ()), f.identifier)
    return keys
