"""Runs the model on one step's ragged batch. Tensors live only here.

The runner keeps each request's token ids and block table between steps; the scheduler sends
only what changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import torch

from tessera.models import AttentionMetadata, LayerKVCache, LlamaForCausalLM
from tessera.sampling import Sampler, SamplingParams, SamplingRow, make_generator
from tessera.scheduler import ModelRunnerOutput, SchedulerOutput

# the engine encoded the request's SamplingParams; nil (no parameters) decodes to None
_decode_params = msgspec.msgpack.Decoder(SamplingParams | None).decode


@dataclass
class CachedRequestState:
    token_ids: list[int]
    block_ids: list[list[int]]  # one table per KV cache group
    num_computed_tokens: int  # the scheduler's count, sent every step the request runs
    params: SamplingParams
    generator: torch.Generator | None
    num_prompt_tokens: int
    matcher: object | None = None
    matcher_vocab: int = 0
    prompt_logprobs: list | None = None  # accumulated across prefill chunks when asked for

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(
            self.params,
            self.generator,
            self.token_ids[: self.num_prompt_tokens],
            self.token_ids[self.num_prompt_tokens :],
            self.matcher,
            self.matcher_vocab,
        )


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        eos_token_ids: tuple[int, ...] = (),
        batch_invariant: bool = True,
    ) -> None:
        self.model = model
        self.batch_invariant = batch_invariant
        self.device = model.device
        self.block_size = block_size
        c = model.config
        # uninitialized, not zeros: pages map as blocks get used, and attention reads only
        # slots that reshape_and_cache has written
        self.kv_caches = [
            LayerKVCache.allocate(
                num_blocks, block_size, c.num_key_value_heads, c.head_dim, kv_dtype, self.device
            )
            for _ in range(c.num_hidden_layers)
        ]
        self.sampler = Sampler(eos_token_ids)
        self.grammars = None  # a GrammarCompiler, set by the engine when structured output is used
        self.requests: dict[str, CachedRequestState] = {}

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_request_ids:
            self.requests.pop(rid, None)
        for rid in so.preempted_request_ids:
            self.requests.pop(rid, None)
        for nr in so.new_requests:
            params = _decode_params(nr.sampling_params) or SamplingParams()
            state = CachedRequestState(
                list(nr.token_ids),
                [list(t) for t in nr.block_ids],
                nr.num_computed_tokens,
                params,
                make_generator(params.seed, self.device),
                nr.num_prompt_tokens or len(nr.token_ids),
            )
            if params.prompt_logprobs is not None:
                state.prompt_logprobs = []
            if params.structured is not None:
                state.matcher = self.grammars.matcher(params.structured)
                state.matcher_vocab = self.grammars.vocab_size
                # a request resumed after preemption replays the output it already has
                state.matcher.consume_tokens(state.token_ids[state.num_prompt_tokens :])
            self.requests[nr.request_id] = state
        for cr in so.cached_requests:
            st = self.requests[cr.request_id]
            for table, new in zip(st.block_ids, cr.new_block_ids, strict=True):
                table.extend(new)
            # the scheduler owns the counts: tokens it did not accept (rejected speculative ones) go
            if len(st.token_ids) < cr.num_tokens:
                raise RuntimeError(
                    f"request {cr.request_id}: the scheduler counts {cr.num_tokens} tokens, the runner "
                    f"holds only {len(st.token_ids)}"
                )
            del st.token_ids[cr.num_tokens :]
            st.num_computed_tokens = cr.num_computed_tokens

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput({})
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_reqs: list[str] = []
        for rid, n in so.num_scheduled_tokens.items():
            st = self.requests[rid]
            start = st.num_computed_tokens
            end = start + n
            ids.extend(st.token_ids[start:end])
            blocks = st.block_ids[0]  # models today have one KV cache group
            for p in range(start, end):
                positions.append(p)
                slots.append(blocks[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            tables.append(blocks)
            if end == len(st.token_ids):  # caught up: this step yields a token
                sample_rows.append(qsl[-1] - 1)
                sample_reqs.append(rid)
        width = max(len(t) for t in tables)
        dev = self.device
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
        counts = torch.tensor(list(so.num_scheduled_tokens.values()))
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=seq_lens_t.to(dev),
            block_tables=table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            token_seq_lens=seq_lens_t.long().repeat_interleave(counts).to(dev),
            batch_invariant=self.batch_invariant,
        )
        hidden = self.model.forward(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_caches,
            meta,
        )
        prompt_lps = self._prompt_logprobs(so, hidden, qsl)
        if not sample_rows:
            return ModelRunnerOutput({}, prompt_logprobs=prompt_lps)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        states = [self.requests[r] for r in sample_reqs]
        sampled = self.sampler(logits, [s.sampling_row() for s in states])
        for st, tok in zip(states, sampled.token_ids, strict=True):
            st.token_ids.append(tok)
        logprobs = {
            rid: [lp] for rid, lp in zip(sample_reqs, sampled.logprobs, strict=True) if lp is not None
        }
        return ModelRunnerOutput(
            {rid: [tok] for rid, tok in zip(sample_reqs, sampled.token_ids, strict=True)},
            logprobs,
            prompt_lps,
        )

    def _prompt_logprobs(self, so: SchedulerOutput, hidden: torch.Tensor, qsl: list[int]) -> dict:
        """Logprobs of each prompt token given the ones before it, for requests that asked; a
        request's list is returned in the step that computes its last prompt token."""
        done = {}
        for i, (rid, n) in enumerate(so.num_scheduled_tokens.items()):
            st = self.requests[rid]
            if st.prompt_logprobs is None:
                continue
            start = st.num_computed_tokens
            last = min(start + n, st.num_prompt_tokens - 1)  # position p predicts prompt token p + 1
            if last > start:
                rows = hidden[qsl[i] : qsl[i] + (last - start)]
                lp = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
                targets = torch.tensor(st.token_ids[start + 1 : last + 1], device=lp.device)
                chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
                k = st.params.prompt_logprobs
                top = lp.topk(k) if k else None
                for j, (tok, v) in enumerate(zip(targets.tolist(), chosen, strict=True)):
                    entry = [(tok, v)]
                    if top is not None:
                        entry += list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
                    st.prompt_logprobs.append(entry)
            if start + n >= st.num_prompt_tokens:
                done[rid] = st.prompt_logprobs
                st.prompt_logprobs = None
        return done
