"""Disaggregated prefill/decode as the scheduler sees it: what a request carries, and the
connector's side that the scheduler calls. The connector moves KV blocks between two engines
(a producer computes prompts, a consumer decodes them); the scheduler only decides which blocks,
and when they may be read, written, hashed or freed. No torch here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

if TYPE_CHECKING:
    from .request import Request


class KVTransferParams(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """vLLM's ``kv_transfer_params``. On a producer, ``do_remote_decode``: compute the prompt and
    one token, then hold the prompt's blocks for a consumer. On a consumer, ``do_remote_prefill``
    and the rest as the producer's answer gave them: where to pull the prompt's blocks from, the
    prompt's hash (the consumer's tokens must be the producer's), and the tokens the producer
    sampled, which count as this request's first output."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_host: str | None = None
    remote_port: int | None = None
    remote_request_id: str | None = None
    remote_block_ids: list[int] = []
    prompt_hash: str | None = None
    first_token_ids: list[int] = []


class KVTransferFailure(msgspec.Struct, frozen=True):
    """Why a consumer's pull failed. ``retryable``: the producer vanished or timed out (the same
    request may succeed later, elsewhere); otherwise the producer refused it as invalid."""

    message: str
    retryable: bool = True


class KVConnectorEvents(msgspec.Struct):
    """What changed since the connector was last polled."""

    loaded: list[str] = []  # consumer: requests whose missing blocks have all been written
    failed: dict[str, KVTransferFailure] = {}  # consumer: requests whose pull failed
    released: list[str] = []  # producer: held requests whose blocks may be freed


class KVConnector(Protocol):
    """The scheduler's side of a connector. Every call comes from the engine's thread; the
    transfers themselves run elsewhere and report through :meth:`poll`."""

    def request_finished(self, request: Request, block_ids: list[int]) -> KVTransferParams | None:
        """A producer's request finished with its prompt computed: hold ``block_ids`` (the
        prompt's blocks) for a consumer and return what the consumer needs to pull them, or
        None to let them be freed now."""

    def start_load(self, request: Request, block_ids: list[int], first_block: int) -> None:
        """A consumer's request got its blocks: write the prompt's blocks ``first_block``,
        ``first_block + 1``, ... (those the prefix cache did not have) into ``block_ids``."""

    def cancel_load(self, request_id: str) -> None:
        """Stop a load early (the request was aborted); it still reports loaded or failed."""

    def poll(self) -> KVConnectorEvents: ...
