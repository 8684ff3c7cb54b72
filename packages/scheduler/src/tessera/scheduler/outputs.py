"""What crosses from the scheduler to the model runner and back: plain data, only deltas.

Every type here decodes from msgpack to a value equal to the one encoded
(``msgspec.msgpack.decode(data, type=SchedulerOutput)``), so an executor can send them to
worker processes as bytes.
"""

from __future__ import annotations

import msgspec

from .kv_transfer import KVTransferFailure, KVTransferParams

# Sampling parameters travel as the msgpack encoding their owner (the engine) made: the
# scheduler passes them through without importing their type, the runner decodes them.
# msgpack nil: no parameters, the runner's defaults.
NO_SAMPLING_PARAMS = msgspec.Raw(b"\xc0")


class MultiModalFeature(msgspec.Struct, array_like=True, frozen=True):
    """One image (or video) of a prompt as the scheduler sees it: where its placeholder tokens
    are, and the content hash that names its encoder output (the encoder cache's key) and enters
    the prefix-cache hash of every block it overlaps (two prompts with the same placeholder tokens
    and different images never share KV blocks)."""

    offset: int  # index of its first placeholder token in the prompt
    length: int  # its placeholder tokens: the encoder output's rows
    identifier: str  # content hash of the processed input
    encoder_tokens: int = 0  # its cost against the per-step encoder budget (0: ``length``)

    @property
    def cost(self) -> int:
        return self.encoder_tokens or self.length


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the runner hasn't seen (or one resumed after preemption: all its tokens)."""

    request_id: str
    token_ids: list[int]
    block_ids: list[list[int]]  # one table per KV cache group
    num_computed_tokens: int
    sampling_params: msgspec.Raw = NO_SAMPLING_PARAMS
    num_prompt_tokens: int = 0  # token_ids beyond this are output tokens (a resumed request)
    mm_features: list[MultiModalFeature] = []  # the prompt's images, by offset


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the runner already holds: its new blocks, and the token counts the scheduler
    (their one owner) holds at the start of this step. The runner computes from
    ``num_computed_tokens`` and drops any tokens of its own past ``num_tokens`` (tokens the
    scheduler did not accept, such as rejected speculative ones)."""

    request_id: str
    new_block_ids: list[list[int]]  # per KV cache group
    num_computed_tokens: int
    num_tokens: int


class SchedulerOutput(msgspec.Struct, omit_defaults=True):
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # request id -> tokens to compute this step, in batch order
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # requests the runner should forget (finished, aborted or preempted since the last step)
    finished_request_ids: list[str] = []
    preempted_request_ids: list[str] = []
    # request id -> the draft tokens it verifies this step; they are counted in its
    # num_scheduled_tokens, after its last token (a request with a draft has caught up)
    scheduled_spec_tokens: dict[str, list[int]] = {}
    # per request, the indices (into its mm_features) whose encoder runs this step: each before
    # the first step whose tokens overlap its placeholders, within max_num_encoder_input_tokens
    scheduled_encoder_inputs: dict[str, list[int]] = {}


class ModelRunnerOutput(msgspec.Struct, omit_defaults=True):
    """Tokens sampled this step; a request still in (chunked) prefill samples none."""

    sampled_token_ids: dict[str, list[int]]
    # request id -> per sampled token [(token, logprob), (top token, logprob), ...], if asked
    logprobs: dict[str, list[list[tuple[int, float]]]] = {}
    # request id -> per prompt token after the first [(token, logprob), (top, logprob), ...],
    # sent once, in the step that finishes the prompt
    prompt_logprobs: dict[str, list[list[tuple[int, float]]]] = {}
    # request id -> draft tokens proposed to follow its sampled ones, to verify next step; a
    # request that verified a draft samples its accepted draft tokens and one more
    spec_token_ids: dict[str, list[int]] = {}


class EngineCoreOutput(msgspec.Struct, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[list[tuple[int, float]]] | None = None
    # disaggregated serving: a producer's finished request, where a consumer may pull its
    # prompt's blocks; a consumer's request whose pull failed (finish_reason "error"), why
    kv_transfer_params: KVTransferParams | None = None
    kv_transfer_failure: KVTransferFailure | None = None


class SchedulerStats(msgspec.Struct):
    num_running: int
    num_waiting: int
    num_preemptions: int  # since start
    kv_cache_usage: float  # share of blocks held by requests
    prefix_cache_queries: int = 0  # prompt tokens looked up since start
    prefix_cache_hits: int = 0  # of which found cached
    # speculative decoding, since start
    num_steps: int = 0  # steps that computed any token
    num_spec_steps: int = 0  # of which verified at least one draft
    spec_num_drafts: int = 0  # drafts verified (one per request and step)
    spec_num_draft_tokens: int = 0  # tokens in them
    spec_num_accepted_tokens: int = 0  # of which accepted
    # prompt tokens run through the model since start (prefix-cache hits and prompts whose K/V a
    # disaggregated consumer pulled are not computed: zero on a consumer that only decodes)
    prompt_tokens_computed: int = 0
    num_waiting_for_remote_kvs: int = 0  # consumer: requests whose prompt's K/V is on its way
    num_kv_held: int = 0  # producer: finished requests whose blocks are held for a consumer

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted."""
        n = self.spec_num_draft_tokens
        return self.spec_num_accepted_tokens / n if n else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verification yields on average: accepted draft tokens and the one sampled
        after them (vLLM's mean acceptance length)."""
        n = self.spec_num_drafts
        return 1.0 + self.spec_num_accepted_tokens / n if n else 0.0

    @property
    def spec_step_share(self) -> float:
        """Share of steps that verified a draft."""
        return self.num_spec_steps / self.num_steps if self.num_steps else 0.0
