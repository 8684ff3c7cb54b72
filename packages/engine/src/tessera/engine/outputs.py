"""What a caller gets back for a request."""

from __future__ import annotations

import msgspec

from tessera.scheduler import KVTransferFailure, KVTransferParams


class RequestOutput(msgspec.Struct, kw_only=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = []
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    delta_text: str = ""  # text added by the latest step (streaming)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # per output token: [(token, logprob), (top token, logprob), ...] when params.logprobs is set
    logprobs: list[list[tuple[int, float]]] | None = None
    # per prompt token after the first, when params.prompt_logprobs is set
    prompt_logprobs: list[list[tuple[int, float]]] | None = None
    # disaggregated serving: a producer's answer, where a consumer may pull the prompt's K/V; a
    # consumer's failed pull (finish_reason "error"): why, and whether a retry may succeed
    kv_transfer_params: KVTransferParams | None = None
    kv_transfer_failure: KVTransferFailure | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
