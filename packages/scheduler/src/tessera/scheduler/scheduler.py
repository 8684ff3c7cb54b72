"""One continuous-batching step under a token budget, with prefix caching and preemption."""

from __future__ import annotations

import itertools
from collections import deque

from tessera.kvcache import KVCacheManager, cdiv

from .config import SchedulerConfig
from .kv_transfer import KVConnector, KVTransferFailure
from .outputs import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)
from .request import Request, RequestStatus, block_extra_keys
from .request_queue import FCFSQueue, PriorityQueue


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv_cache: KVCacheManager, connector: KVConnector | None = None
    ) -> None:
        self.config = config
        self.kv = kv_cache
        # disaggregated prefill/decode (kv_transfer.py); one KV cache group: tables are group 0's
        self.connector = connector
        self._loading: dict[str, Request] = {}  # consumer: their prompt's blocks are being written
        self._ready: deque[Request] = deque()  # consumer: loaded, to run from the end of the prompt
        self._reaping: set[str] = set()  # aborted while loading: blocks freed once the load ends
        self._held: set[str] = set()  # producer: finished, blocks held until a consumer pulled them
        self._pending: list[EngineCoreOutput] = []  # outputs made between steps, sent with the next
        self.prompt_tokens_computed = 0
        self.num_scheduled_last_step = 0
        self.requests: dict[str, Request] = {}
        self.waiting = PriorityQueue() if config.policy == "priority" else FCFSQueue()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._seq = itertools.count()
        self._finished_ids: list[str] = []
        self._preempted_ids: list[str] = []
        self.num_steps = 0
        self.num_spec_steps = 0
        self.spec_num_drafts = 0
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        # one request of max_model_len tokens must be able to run alone, in every KV cache group
        per_group = kv_cache.blocks_for_context(config.max_model_len, config.max_num_batched_tokens)
        if sum(per_group) > kv_cache.num_blocks:
            split = f" ({' + '.join(map(str, per_group))} in its groups)" if len(per_group) > 1 else ""
            raise ValueError(
                f"max_model_len {config.max_model_len} needs {sum(per_group)} KV blocks of "
                f"{kv_cache.block_size} tokens{split} but the cache has only {kv_cache.num_blocks}"
            )

    # -- admission and exit -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; refused (nothing changes) if it can never run."""
        if request.request_id in self.requests or request.request_id in self._held | self._reaping:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.kv_transfer is not None and self.connector is None:
            raise ValueError(
                f"request {request.request_id} has kv_transfer_params, but this engine has no KV "
                "connector (start it with a kv_transfer_config)"
            )
        if request.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens, more than the maximum "
                f"context length of {self.config.max_model_len}"
            )
        if request.status != RequestStatus.WAITING:
            raise ValueError(f"request {request.request_id} is {request.status.name}, not WAITING")
        for i, f in enumerate(request.mm_features):
            if f.cost > self.config.encoder_budget:
                raise ValueError(
                    f"request {request.request_id}: its input {i} needs {f.cost} encoder tokens, more than "
                    f"max_num_encoder_input_tokens ({self.config.encoder_budget}) allows in a step"
                )
        request.seq = next(self._seq)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End requests from outside (abort, a stop string, an error); unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        was = req.status
        req.transition(status)
        rid = req.request_id
        free = True
        if was == RequestStatus.RUNNING:
            self.running.remove(req)
        elif was == RequestStatus.WAITING_FOR_REMOTE_KVS:
            if rid in self._loading:  # the connector may still be writing into its blocks
                del self._loading[rid]
                self._reaping.add(rid)
                self.connector.cancel_load(rid)
                free = False
            elif req in self._ready:
                self._ready.remove(req)
        else:
            self.waiting.remove(req)
        if free and not self._hold_for_consumer(req, status):
            self.kv.free(rid)
        del self.requests[rid]
        self._finished_ids.append(rid)

    # -- disaggregated prefill/decode ---------------------------------------------------------

    def _hold_for_consumer(self, req: Request, status: RequestStatus) -> bool:
        """A producer's request that computed its prompt and ended by length (its one token):
        its prompt's blocks stay allocated (and cached) until the connector releases them."""
        kvt = req.kv_transfer
        if (
            kvt is None
            or not kvt.do_remote_decode
            or status != RequestStatus.FINISHED_LENGTH
            or req.num_computed_tokens < req.num_prompt_tokens
        ):
            return False
        n = cdiv(req.num_prompt_tokens, self.kv.block_size)
        params = self.connector.request_finished(req, self.kv.block_ids(req.request_id)[0][:n])
        if params is None:
            return False
        req.kv_transfer_result = params
        self._held.add(req.request_id)
        return True

    def _start_load(self, req: Request) -> bool:
        """Blocks for a consumer's request (its prompt and the producer's tokens), prefix-cache
        hits first; the connector pulls the prompt's other blocks while the request waits. False
        (nothing changed) if the pool can't serve it now."""
        rid = req.request_id
        hits, num_hit = self.kv.get_computed_blocks(rid, req.all_token_ids, cache_salt=req.cache_salt)
        num_first = len(req.kv_transfer.first_token_ids)
        total = min(req.num_tokens + num_first, self.config.max_model_len)
        if self.kv.allocate_slots(rid, total, new_computed_blocks=hits) is None:
            return False
        self.waiting.pop()
        req.transition(RequestStatus.WAITING_FOR_REMOTE_KVS)
        req.num_cached_tokens = num_hit
        self._loading[rid] = req
        first = num_hit // self.kv.block_size
        table = self.kv.block_ids(rid)[0][: cdiv(req.num_prompt_tokens, self.kv.block_size)]
        self.connector.start_load(req, table[first:], first)
        return True

    def poll_kv_connector(self) -> None:
        """Apply what the connector finished: free released holds, make loaded requests runnable
        (their first tokens are output now), end failed ones. Called at every step and by an
        idle engine loop."""
        if self.connector is None:
            return
        events = self.connector.poll()
        for rid in events.released:
            if rid in self._held:
                self._held.discard(rid)
                self.kv.free(rid)
        for rid in events.loaded:
            self._load_ended(rid, None)
        for rid, failure in events.failed.items():
            self._load_ended(rid, failure)

    def _load_ended(self, rid: str, failure: KVTransferFailure | None) -> None:
        if rid in self._reaping:
            self._reaping.discard(rid)
            self.kv.free(rid)
            return
        req = self._loading.pop(rid, None)
        if req is None:
            return
        if failure is not None:
            # its pulled blocks were never hashed: freed, no half-written block is ever found
            self._finish(req, RequestStatus.FINISHED_ERROR)
            self._pending.append(
                EngineCoreOutput(
                    rid,
                    [],
                    finish_reason="error",
                    stop_reason=failure.message,
                    num_cached_tokens=req.num_cached_tokens,
                    kv_transfer_failure=failure,
                )
            )
            return
        req.needs_remote_kvs = False
        self.kv.cache_blocks(rid, req.all_token_ids, req.num_prompt_tokens)
        appended, status = self._append_tokens(req, req.kv_transfer.first_token_ids)
        if status is not None:
            self._finish(req, status)
        else:
            self._ready.append(req)
        self._pending.append(
            EngineCoreOutput(
                rid,
                appended,
                finish_reason=status.finish_reason if status is not None else None,
                stop_reason=req.stop_reason,
                num_cached_tokens=req.num_cached_tokens,
            )
        )

    def _append_tokens(self, req: Request, tokens) -> tuple[list[int], RequestStatus | None]:
        """Append ``tokens`` to the request's output up to the first that stops it: the ones
        appended, and the stop status (None: it goes on)."""
        appended: list[int] = []
        for token in tokens:
            req.append_output_token(token)
            appended.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                return appended, status
        return appended, None

    def kv_transfers_in_flight(self) -> bool:
        """Loads running or blocks held: the connector has news to poll for."""
        return bool(self._loading or self._reaping or self._held)

    def _pick_victim(self, first_unscheduled: int) -> Request:
        """Latest arrival (FCFS) or lowest priority, among requests not yet scheduled this step:
        their blocks may already be registered in the prefix cache for this step's writes."""
        if self.config.policy == "priority":
            return max(self.running[first_unscheduled:], key=PriorityQueue.key)
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        """Give up the request's blocks; it recomputes (keeping its output) when re-admitted,
        from the prefix cache where its blocks survive."""
        self.running.remove(req)
        req.transition(RequestStatus.PREEMPTED)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.spec_token_ids = []  # proposed from a state the runner forgets; resumed, it prefills
        req.encoded.clear()  # the runner forgets the request's inputs too (its encoder cache may not)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_preempted(req)
        self._preempted_ids.append(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._pending)

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached: list[CachedRequestData] = []
        new: list[NewRequestData] = []
        spec_tokens: dict[str, list[int]] = {}
        encoder_inputs: dict[str, list[int]] = {}
        encoder_budget = self.config.encoder_budget
        preempted_now = False
        self.poll_kv_connector()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            n, encode, cost = self._encoder_inputs(req, req.num_computed_tokens, n, encoder_budget)
            if n <= 0:
                i += 1
                continue
            draft = self._draft_to_verify(req, n, budget)
            # no slot past the context: a draft is cut to fit it, a proposer drafts within it
            room = self.config.max_model_len - req.num_computed_tokens - n
            lookahead = min(len(draft) + self.config.num_lookahead_tokens, max(room, len(draft)))
            new_blocks = self._allocate(req, n, lookahead)
            if new_blocks is None and lookahead:  # a draft never costs anyone a preemption
                draft = []
                new_blocks = self._allocate(req, n)
            while new_blocks is None:
                victim = self._pick_victim(i)
                self._preempt(victim)
                preempted_now = True
                if victim is req:
                    break
                new_blocks = self._allocate(req, n)
            if new_blocks is None:
                continue  # req itself was preempted; running[i] is now the next one
            req.spec_token_ids = []
            if draft:
                spec_tokens[req.request_id] = draft
                n += len(draft)
            num_scheduled[req.request_id] = n
            budget -= n
            self._encode(req, encode, encoder_inputs)
            encoder_budget -= cost
            cached.append(
                CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens, req.num_tokens)
            )
            i = self.running.index(req) + 1

        # a consumer's requests whose prompt's K/V has arrived: only the producer's tokens to compute
        while (
            not preempted_now and self._ready and budget > 0 and len(self.running) < self.config.max_num_seqs
        ):
            req = self._ready.popleft()
            req.transition(RequestStatus.RUNNING)
            req.num_computed_tokens = req.num_prompt_tokens
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            self.running.append(req)
            new.append(
                NewRequestData(
                    req.request_id,
                    list(req.all_token_ids),
                    self.kv.block_ids(req.request_id),
                    req.num_computed_tokens,
                    req.sampling_params,
                    req.num_prompt_tokens,
                    req.mm_features,
                )
            )
            num_scheduled[req.request_id] = n
            budget -= n

        while (
            not preempted_now and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting.peek()
            if req.needs_remote_kvs:
                if not self._start_load(req):
                    break
                continue
            extra = block_extra_keys(req.mm_features, req.num_prompt_tokens, self.kv.block_size)
            hits, num_hit = self.kv.get_computed_blocks(
                req.request_id, req.all_token_ids, cache_salt=req.cache_salt, extra_keys=extra
            )
            if req.skip_prefix_cache:
                hits, num_hit = [], 0
            n = req.num_tokens - num_hit
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            n, encode, cost = self._encoder_inputs(req, num_hit, n, encoder_budget)
            if n <= 0 or (n < req.num_tokens - num_hit and not self.config.enable_chunked_prefill):
                break  # its next image waits for the encoder budget of a later step
            # lookahead once the prompt is all in: the step samples, and a proposer may write
            lookahead = 0
            if num_hit + n == req.num_tokens:
                lookahead = min(self.config.num_lookahead_tokens, self.config.max_model_len - req.num_tokens)
            added = None
            if lookahead:
                added = self.kv.allocate_slots(
                    req.request_id, num_hit + n, num_lookahead=lookahead, new_computed_blocks=hits
                )
            if added is None:
                added = self.kv.allocate_slots(req.request_id, num_hit + n, new_computed_blocks=hits)
            if added is None:
                break
            self.waiting.pop()
            req.transition(RequestStatus.RUNNING)
            req.num_computed_tokens = num_hit
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            self.kv.cache_blocks(req.request_id, req.all_token_ids, num_hit + n)
            self.running.append(req)
            new.append(
                NewRequestData(
                    req.request_id,
                    list(req.all_token_ids),
                    self.kv.block_ids(req.request_id),
                    num_hit,
                    req.sampling_params,
                    req.num_prompt_tokens,
                    req.mm_features,
                )
            )
            num_scheduled[req.request_id] = n
            budget -= n
            self._encode(req, encode, encoder_inputs)
            encoder_budget -= cost

        out = SchedulerOutput(
            new_requests=new,
            cached_requests=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_request_ids=self._finished_ids,
            preempted_request_ids=self._preempted_ids,
            scheduled_spec_tokens=spec_tokens,
            scheduled_encoder_inputs=encoder_inputs,
        )
        self._finished_ids, self._preempted_ids = [], []
        self.num_scheduled_last_step = out.total_num_scheduled_tokens
        self.num_steps += out.total_num_scheduled_tokens > 0
        self.num_spec_steps += bool(spec_tokens)
        return out

    @staticmethod
    def _encoder_inputs(req: Request, start: int, n: int, budget: int) -> tuple[int, list[int], int]:
        """For the tokens ``start .. start + n - 1`` of ``req``: how many may run (fewer where an
        input they overlap does not fit the step's encoder budget: they stop before its first
        placeholder), the inputs to encode first (overlapped and not yet encoded since the
        request started running), and their encoder tokens."""
        chosen: list[int] = []
        cost = 0
        for i, f in enumerate(req.mm_features):
            if f.offset >= start + n:
                break
            if f.offset + f.length <= start or i in req.encoded:
                continue  # computed already (or cached), or its output is with the runner
            if cost + f.cost > budget:
                return max(f.offset - start, 0), chosen, cost
            chosen.append(i)
            cost += f.cost
        return n, chosen, cost

    @staticmethod
    def _encode(req: Request, indices: list[int], encoder_inputs: dict[str, list[int]]) -> None:
        if indices:
            req.encoded.update(indices)
            encoder_inputs[req.request_id] = indices

    def _draft_to_verify(self, req: Request, n: int, budget: int) -> list[int]:
        """The part of the request's draft to verify this step: none while it is still
        prefilling; no more than the token budget, its remaining output (the token sampled
        after the draft counts) or the context leave room for."""
        if not req.spec_token_ids or req.num_computed_tokens + n != req.num_tokens:
            return []
        k = min(
            len(req.spec_token_ids),
            budget - n,
            req.max_tokens - len(req.output_token_ids) - 1,
            self.config.max_model_len - req.num_tokens,
        )
        return req.spec_token_ids[: max(k, 0)]

    def _allocate(self, req: Request, n: int, num_lookahead: int = 0) -> list[list[int]] | None:
        """Slots for ``n`` more tokens and ``num_lookahead`` draft tokens after them. Only blocks
        of known tokens are hashed: a draft's slots hold K/V of tokens that may be rejected, and
        are overwritten from the accepted length on."""
        new_blocks = self.kv.allocate_slots(
            req.request_id,
            req.num_computed_tokens + n,
            num_lookahead=num_lookahead,
            num_computed_tokens=req.num_computed_tokens,
        )
        if new_blocks is not None:
            self.kv.cache_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens + n)
        return new_blocks

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Advance computed counts, append sampled tokens, apply stop rules, free finished."""
        outputs, self._pending = self._pending, []
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            sampled = runner_output.sampled_token_ids.get(rid, ())
            start = req.num_computed_tokens
            self.prompt_tokens_computed += max(0, min(start + n, req.num_prompt_tokens) - start)
            req.num_computed_tokens += n
            draft = scheduler_output.scheduled_spec_tokens.get(rid)
            if draft:
                # the slots of rejected draft tokens are recomputed (overwritten) from here on
                accepted = max(len(sampled) - 1, 0)
                req.num_computed_tokens -= len(draft) - accepted
                self.spec_num_drafts += 1
                self.spec_num_draft_tokens += len(draft)
                self.spec_num_accepted_tokens += accepted
            appended, status = self._append_tokens(req, sampled)
            if status is not None:
                self._finish(req, status)
            else:
                req.spec_token_ids = list(runner_output.spec_token_ids.get(rid, ()))
            if appended or status is not None:
                lp = runner_output.logprobs.get(rid)
                outputs.append(
                    EngineCoreOutput(
                        rid,
                        appended,
                        finish_reason=status.finish_reason if status is not None else None,
                        stop_reason=req.stop_reason,
                        num_cached_tokens=req.num_cached_tokens,
                        logprobs=lp[: len(appended)] if lp else None,
                        prompt_logprobs=runner_output.prompt_logprobs.get(rid),
                        kv_transfer_params=req.kv_transfer_result,
                    )
                )
        return outputs

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        if len(req.output_token_ids) >= req.min_tokens:
            if not req.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in req.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def reset_prefix_cache(self) -> int:
        return self.kv.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=self.kv.usage(),
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_steps=self.num_steps,
            num_spec_steps=self.num_spec_steps,
            spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=self.spec_num_accepted_tokens,
            prompt_tokens_computed=self.prompt_tokens_computed,
            num_waiting_for_remote_kvs=len(self._loading) + len(self._ready),
            num_kv_held=len(self._held),
        )
