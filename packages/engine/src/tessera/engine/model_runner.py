"""Runs the model on one step's ragged batch. Tensors live only here.

The runner keeps each request's token ids and block table between steps; the scheduler sends
only what changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec
import torch

from tessera.kvcache import KVCacheGroups, KVCacheSpec, group_layers
from tessera.models import CausalLM, LayerKVCache, SupportsMultiModal, TPInfo, build_attention_metadata
from tessera.models.parallel import NO_TP
from tessera.sampling import Sampler, SamplingParams, SamplingRow, make_generator, speculative_rows
from tessera.scheduler import ModelRunnerOutput, SchedulerOutput
from tessera.spec_decode import (
    Acceptance,
    AdaptivePolicy,
    ProposalRequest,
    Proposer,
    SpeculativeConfig,
    StepTimes,
    make_proposer,
    rejection_sample,
)

from .cuda_graphs import DecodeGraphs, capture_sizes, graph_blocker
from .input_buffers import InputBuffers

logger = logging.getLogger(__name__)

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
    acceptance: Acceptance | None = None  # of its speculative drafts, when speculation is on
    draft_probs: torch.Tensor | None = None  # [k, vocab]: what a sampling proposer drew its draft from

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
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        eos_token_ids: tuple[int, ...] = (),
        batch_invariant: bool = True,
        groups: KVCacheGroups | None = None,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        buffered: bool | None = None,
        speculative_config: SpeculativeConfig | None = None,
        proposer: Proposer | None = None,
        encoder_cache_bytes: int = 256 << 20,
        tp: TPInfo = NO_TP,
    ) -> None:
        """On a CUDA device (or with ``buffered``) the step's inputs go through persistent
        buffers and pure-decode steps replay CUDA graphs (unless ``enforce_eager``); sized by
        ``max_num_seqs``, ``max_num_batched_tokens`` and ``max_model_len``.

        With ``speculative_config`` every request that sampled proposes a draft (``proposer``, by
        default the one the config names) of as many tokens as the adaptive policy chooses; the
        scheduler sends it back to verify in the next step.

        With ``tp`` of several ranks, rank 0 samples (and proposes); it broadcasts each step's
        tokens and the other ranks append those, so every rank's state is rank 0's."""
        self.model = model
        self.tp = tp
        self.batch_invariant = batch_invariant
        self.device = model.device
        self.block_size = block_size
        specs = model.kv_cache_spec()
        if groups is None:  # one group of every layer
            groups = group_layers([KVCacheSpec(s.sliding_window, s.num_kv_heads, s.head_dim) for s in specs])
        self.num_groups = len(groups)
        # A block id is a page of each of the group_size tensors; layer L uses tensor j of its
        # group (vLLM's hybrid allocator): the groups' block ids never collide, so they share
        # the tensors. Uninitialized, not zeros: pages map as blocks get used, and attention
        # reads only slots that reshape_and_cache has written.
        shapes = {(s.num_kv_heads, s.head_dim) for s in specs}
        if len(shapes) != 1:
            raise ValueError(
                f"layers with different KV shapes (heads, head size) {sorted(shapes)} are not supported"
            )
        ((kv_heads, head_dim),) = shapes
        buffered = self.device.type == "cuda" if buffered is None else buffered
        # M-RoPE (Qwen2-VL) takes [3, T] positions, which the persistent buffers and the decode
        # graphs do not hold: such a model runs eagerly
        buffered = buffered and not getattr(model, "uses_mrope", False)
        # with buffers, one more page than the allocator knows: the slot that padding rows of a
        # replayed decode graph write to (the cache-write op would take slot -1 as the last slot)
        self.dummy_block = num_blocks
        self.kv_caches = [
            LayerKVCache.allocate(
                num_blocks + buffered, block_size, kv_heads, head_dim, kv_dtype, self.device
            )
            for _ in range(groups.group_size)
        ]
        slots = [groups.layer_slot(layer) for layer in range(len(specs))]
        self.layer_group = [g for g, _ in slots]
        # a draft model's K/V lives at the slots of the target's full-attention group
        self.full_group = next(
            (g for g, gr in enumerate(groups.groups) if gr.spec.sliding_window is None), None
        )
        self.layer_caches = [self.kv_caches[j] for _, j in slots]
        self.sampler = Sampler(eos_token_ids)
        self.proposer: Proposer | None = None
        self.spec_policy: AdaptivePolicy | None = None
        self.step_times = StepTimes()  # decode steps' seconds against their tokens
        self.max_num_batched_tokens = max_num_batched_tokens
        if speculative_config is not None and tp.rank == 0:
            self.proposer = proposer or make_proposer(speculative_config)
            self.spec_policy = AdaptivePolicy(
                speculative_config.num_speculative_tokens,
                adaptive=speculative_config.adaptive,
                disable_by_batch_size=speculative_config.disable_by_batch_size,
            )
        self.grammars = None  # a GrammarCompiler, set by the engine when structured output is used
        self.grammar_factory = None  # or built here on first use (a worker process)
        # a vision-language model's encoder outputs (encoder_runner.py); None for text models
        self.encoders = None
        if isinstance(model, SupportsMultiModal):
            from .encoder_runner import EncoderRunner  # pillow and the processors: only for them

            self.encoders = EncoderRunner(model, encoder_cache_bytes)
        self.requests: dict[str, CachedRequestState] = {}
        self.max_model_len = max_model_len or num_blocks * block_size
        self.inputs: InputBuffers | None = None
        self.graphs: DecodeGraphs | None = None
        self._warned_unbuffered = False
        if buffered:
            sizes = [] if enforce_eager else capture_sizes(max_num_seqs)
            self.inputs = InputBuffers(
                max(max_num_batched_tokens, max(sizes, default=0)),
                max_num_seqs,
                # +1: a step may hold a block past the context (speculative tokens, lookahead)
                -(-self.max_model_len // block_size) + 1,
                self.num_groups,
                block_size,
                self.device,
                graph_rows=max(sizes, default=0),
            )
            if sizes:
                self._capture_graphs(sizes)
        if speculative_config is not None and speculative_config.adaptive and num_blocks >= 1:
            self._measure_step_times()  # every rank: the forwards hold collectives

    @torch.inference_mode()
    def _measure_step_times(self, repeats: int = 3) -> None:
        """Seed the policy's cost curve before the first request: decode-like forwards (every
        row's logits) of 1, 2, 4 ... 64 tokens (at most max_num_batched_tokens), timed after one
        untimed, and the proposer's own forward. A step of n tokens is n // block_size sequences
        of a block each (and the rest), all writing K/V into block 0, which no request holds yet."""
        dev = self.device
        sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max(1, self.max_num_batched_tokens)]
        for i, n in enumerate((1, *(sizes * repeats))):
            full, rest = divmod(n, self.block_size)
            lens = [self.block_size] * full + ([rest] if rest else [])
            positions, metas = build_attention_metadata(
                lens, lens, [[[0]] * len(lens)] * self.num_groups, self.block_size, dev, self.batch_invariant
            )
            t0 = time.perf_counter()
            hidden = self.model.forward(
                torch.zeros(n, dtype=torch.int64, device=dev),
                positions,
                self.layer_caches,
                [metas[g] for g in self.layer_group],
            )
            self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            if i:  # the first pays for first-use set-up
                self.step_times.observe(n, time.perf_counter() - t0)
        if self.proposer is not None:
            self.proposer.measure([0] if self.full_group is not None else [], self.block_size, repeats)
            self._calibrate(1)

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_request_ids:
            self.requests.pop(rid, None)
            if self.encoders is not None:
                self.encoders.stop(rid, finished=True)
        for rid in so.preempted_request_ids:
            self.requests.pop(rid, None)
            if self.encoders is not None:
                self.encoders.stop(rid, finished=False)
        if self.proposer is not None and (so.finished_request_ids or so.preempted_request_ids):
            self.proposer.release([*so.finished_request_ids, *so.preempted_request_ids])
        for nr in so.new_requests:
            if self.encoders is not None:
                self.encoders.start(nr.request_id, nr.mm_features)
            elif nr.mm_features:
                raise RuntimeError(f"request {nr.request_id} has images but the model takes none")
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
            if self.spec_policy is not None:
                state.acceptance = self.spec_policy.new_acceptance()
            if params.structured is not None and self.tp.rank == 0:  # only rank 0 samples
                if self.grammars is None and self.grammar_factory is not None:
                    self.grammars = self.grammar_factory()
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
        if so.scheduled_encoder_inputs:
            self.encoders.encode(so.scheduled_encoder_inputs)
        t0 = time.perf_counter()
        ids: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_reqs: list[str] = []
        drafts = so.scheduled_spec_tokens
        chunks: list[tuple[str, int, int]] = []
        for rid, n in so.num_scheduled_tokens.items():
            st = self.requests[rid]
            start = st.num_computed_tokens
            end = start + n
            chunks.append((rid, start, n))
            draft = drafts.get(rid, ())
            # a draft verifies in one chunk after the request's last token: k + 1 logit rows
            ids.extend(st.token_ids[start : end - len(draft)])
            ids.extend(draft)
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            tables.append(st.block_ids)  # one table per KV cache group
            if end - len(draft) == len(st.token_ids):  # caught up: this step yields tokens
                sample_rows.extend(range(qsl[-1] - 1 - len(draft), qsl[-1]))
                sample_reqs.append(rid)
        query_lens = list(so.num_scheduled_tokens.values())
        group_tables = [[t[g] for t in tables] for g in range(self.num_groups)]
        dev = self.device
        hidden = embeds = None
        if self.encoders is not None:  # a chunk over placeholders: the images' rows merged in
            embeds = self.encoders.embeds(ids, chunks, dev)
        if self.inputs is not None and embeds is None:
            hidden = self._forward_buffered(ids, query_lens, seq_lens, group_tables)
        if hidden is None:
            positions, metas = build_attention_metadata(
                query_lens, seq_lens, group_tables, self.block_size, dev, self.batch_invariant
            )
            if self.encoders is not None and self.encoders.uses_mrope:
                prompt_lens = {rid: self.requests[rid].num_prompt_tokens for rid, _, _ in chunks}
                positions = self.encoders.positions(chunks, positions, prompt_lens)
            hidden = self.model.forward(
                torch.tensor(ids, dtype=torch.int64, device=dev),
                positions,
                self.layer_caches,
                [metas[g] for g in self.layer_group],
                **({"inputs_embeds": embeds} if embeds is not None else {}),
            )
        prompt_lps = self._prompt_logprobs(so, hidden, qsl)
        if not sample_rows:
            return ModelRunnerOutput({}, prompt_logprobs=prompt_lps)
        if self.inputs is not None and len(sample_rows) == hidden.shape[0]:  # decode: no gather
            logits = self.model.compute_logits(hidden)
        else:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        if self.tp.rank > 0:  # rank 0's tokens are the step's
            for rid, toks in self._receive_tokens(sample_reqs, drafts).items():
                self.requests[rid].token_ids.extend(toks)
            return ModelRunnerOutput({})
        try:
            if drafts:
                new_tokens, logprobs = self._verify(logits, sample_reqs, drafts)
            else:
                states = [self.requests[r] for r in sample_reqs]
                sampled = self.sampler(logits, [s.sampling_row() for s in states])
                new_tokens = {rid: [tok] for rid, tok in zip(sample_reqs, sampled.token_ids, strict=True)}
                logprobs = {
                    rid: [lp] for rid, lp in zip(sample_reqs, sampled.logprobs, strict=True) if lp is not None
                }
        except BaseException:
            if self.tp.size > 1:  # the other ranks wait for the tokens: tell them the step failed
                self._share_tokens(None, sample_reqs, drafts)
            raise
        if self.tp.size > 1:
            self._share_tokens(new_tokens, sample_reqs, drafts)
        for rid, toks in new_tokens.items():
            self.requests[rid].token_ids.extend(toks)
        if self.proposer is not None and so.total_num_scheduled_tokens == len(sample_reqs) + sum(
            map(len, drafts.values())
        ):  # a decode step (the sampled tokens are on the host: it has finished)
            self.step_times.observe(so.total_num_scheduled_tokens, time.perf_counter() - t0)
        return ModelRunnerOutput(
            new_tokens, logprobs, prompt_lps, self._propose(sample_reqs) if self.proposer else {}
        )

    # -- tensor parallelism: rank 0's tokens to the other ranks ----------------------------------

    def _token_buffer(self, sample_reqs: list[str], drafts: dict[str, list[int]]) -> torch.Tensor:
        """Per sampling request its count, then room for its k + 1 tokens: every rank knows the
        size from the step it was sent."""
        n = len(sample_reqs) + sum(len(drafts.get(r, ())) + 1 for r in sample_reqs)
        dev = self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        return torch.zeros(n, dtype=torch.int64, device=dev)

    def _share_tokens(self, new_tokens, sample_reqs: list[str], drafts: dict[str, list[int]]) -> None:
        buf = self._token_buffer(sample_reqs, drafts)
        if new_tokens is None:
            buf[0] = -1  # the step failed on rank 0
        else:
            flat = [len(new_tokens[r]) for r in sample_reqs]
            for r in sample_reqs:
                toks = new_tokens[r]
                flat += toks + [0] * (len(drafts.get(r, ())) + 1 - len(toks))
            buf.copy_(torch.tensor(flat, dtype=torch.int64))
        torch.distributed.broadcast(buf, src=0)

    def _receive_tokens(self, sample_reqs: list[str], drafts: dict[str, list[int]]) -> dict[str, list[int]]:
        buf = self._token_buffer(sample_reqs, drafts)
        torch.distributed.broadcast(buf, src=0)
        values = buf.tolist()
        if values and values[0] < 0:
            raise RuntimeError("rank 0 failed to sample this step")
        out, at = {}, len(sample_reqs)
        for i, r in enumerate(sample_reqs):
            out[r] = values[at : at + values[i]]
            at += len(drafts.get(r, ())) + 1
        return out

    # -- speculative decoding ------------------------------------------------------------------

    def _verify(
        self, logits: torch.Tensor, sample_reqs: list[str], drafts: dict[str, list[int]]
    ) -> tuple[dict[str, list[int]], dict]:
        """The tokens of a step in which some requests verify drafts (``logits`` has ``k + 1``
        rows for those, one for the others): the plain sampler for the others, the target's
        processed distributions at every draft position and the rejection sampler for these."""
        plain_rows, spec_rows, plain, spec = [], [], [], []
        row = 0
        for rid in sample_reqs:
            k = len(drafts.get(rid, ()))
            (spec_rows if k else plain_rows).extend(range(row, row + k + 1))
            (spec if k else plain).append(rid)
            row += k + 1
        new_tokens: dict[str, list[int]] = {}
        logprobs = {}
        if plain:
            states = [self.requests[r] for r in plain]
            sampled = self.sampler(logits[plain_rows], [s.sampling_row() for s in states])
            for rid, tok, lp in zip(plain, sampled.token_ids, sampled.logprobs, strict=True):
                new_tokens[rid] = [tok]
                if lp is not None:
                    logprobs[rid] = [lp]
        base = [self.requests[r].sampling_row() for r in spec]
        draft_list = [drafts[r] for r in spec]
        rows = [r for b, d in zip(base, draft_list, strict=True) for r in speculative_rows(b, d)]
        spec_logits = logits[spec_rows]
        probs = self.sampler.probabilities(spec_logits, rows)
        out = rejection_sample(probs, draft_list, base, self._draft_probs(spec, draft_list, probs.shape[1]))
        eos = set(self.sampler.eos_token_ids)
        start = 0
        for rid, d, toks, n_acc in zip(spec, draft_list, out.token_ids, out.num_accepted, strict=True):
            st = self.requests[rid]
            st.draft_probs = None
            self.spec_policy.record(st.acceptance, len(d), n_acc)
            if st.params.logprobs is not None:
                logprobs[rid] = _logprob_entries(
                    spec_logits[start : start + len(toks)], toks, st.params.logprobs
                )
            start += len(d) + 1
            if st.matcher is not None:
                # the matcher advances over the kept tokens only, as far as an EOS (which, like
                # the plain sampler, it is offered last; a stopped matcher refuses it)
                stop = next((i for i, t in enumerate(toks) if t in eos), len(toks))
                if not st.matcher.consume_tokens(toks[:stop]):
                    raise RuntimeError(f"request {rid}: the grammar matcher refused verified tokens {toks}")
                if stop < len(toks):
                    st.matcher.consume_token(toks[stop])
            new_tokens[rid] = toks
        return {rid: new_tokens[rid] for rid in sample_reqs}, logprobs

    def _propose(self, sample_reqs: list[str]) -> dict[str, list[int]]:
        """Drafts to follow the tokens just sampled, k per request from the policy. A sampling
        proposer's distributions stay here, with the request, until its draft is verified."""
        states = [self.requests[r] for r in sample_reqs]
        self._calibrate(len(states))
        ks = []
        for rid, st in zip(sample_reqs, states, strict=True):
            limit = self.max_model_len - len(st.token_ids)
            if st.params.max_tokens is not None:
                limit = min(limit, st.params.max_tokens - (len(st.token_ids) - st.num_prompt_tokens) - 1)
            catch_up = 0.0
            if self.proposer.forward_seconds:  # a proposer that runs a model may have to catch up
                behind = self.proposer.catch_up_tokens(ProposalRequest(rid, st.token_ids))
                catch_up = self._catch_up_cost(behind, len(states))
            ks.append(self.spec_policy.choose_k(st.acceptance, len(states), limit, catch_up))
        if not any(ks):
            for st in states:
                st.acceptance.break_run()
            return {}
        requests = [self._proposal(rid, st) for rid, st in zip(sample_reqs, states, strict=True)]
        drafts = self.proposer.draft(requests, ks)
        for st, d in zip(states, drafts.token_ids, strict=True):
            if not d:  # no draft this step (none asked for, or no match): a run ends
                st.acceptance.break_run()
        if drafts.probs is not None:
            start = 0
            for st, d in zip(states, drafts.token_ids, strict=True):
                st.draft_probs = drafts.probs[start : start + len(d)] if d else None
                start += len(d)
        return {rid: d for rid, d in zip(sample_reqs, drafts.token_ids, strict=True) if d}

    def _catch_up_cost(self, tokens: int, batch_size: int) -> float:
        """A proposer's catch-up over ``tokens`` context tokens, in plain steps of this batch:
        its one-token forward's measured seconds, scaled along the target's step curve."""
        if tokens <= 0 or not self.proposer.forward_seconds:
            return 0.0
        s = self.step_times.seconds
        one, plain = s(1), s(batch_size)
        if one <= 0 or plain <= 0:
            return 0.0
        return self.proposer.forward_seconds * s(tokens) / one / plain

    def _calibrate(self, batch_size: int) -> None:
        """The policy's costs from this machine's measured step times, once there are some: the
        curve of a step's seconds against its tokens (``step_seconds``; ``token_cost``, from a
        line through them, where there is no curve yet), a drafted position's against a plain
        step of this batch (``draft_cost``)."""
        line = self.step_times.line()
        if line is not None:
            w, t = line
            self.spec_policy.token_cost = min(max(t / w, 1 / 256), 1.0)
        plain_step = self.step_times.seconds(batch_size)
        if plain_step > 0:  # the measured curve, once two token counts are timed
            self.spec_policy.step_seconds = self.step_times.seconds
        elif line is not None:
            plain_step = w + batch_size * t
        else:
            plain_step = self.step_times.mean_seconds()
        if self.proposer.forward_seconds and plain_step:
            self.spec_policy.draft_cost = self.proposer.forward_seconds / plain_step

    def _proposal(self, rid: str, st: CachedRequestState) -> ProposalRequest:
        if self.full_group is None:  # no table a draft model could write to
            return ProposalRequest(rid, st.token_ids, row=st.sampling_row())
        table = st.block_ids[self.full_group]
        return ProposalRequest(rid, st.token_ids, table, len(table) * self.block_size, st.sampling_row())

    def _draft_probs(self, spec: list[str], drafts: list[list[int]], vocab: int) -> torch.Tensor | None:
        """``[sum(k), vocab]`` draft distributions of the drafts being verified (the scheduler may
        have cut a draft: its first rows), one-hot rows for a deterministic proposer's; None when
        every draft is deterministic (the n-gram case)."""
        states = [self.requests[r] for r in spec]
        if all(st.draft_probs is None for st in states):
            return None
        rows = []
        for st, d in zip(states, drafts, strict=True):
            if st.draft_probs is not None:
                rows.append(st.draft_probs[: len(d)].to(self.device, torch.float32))
            else:
                one_hot = torch.zeros(len(d), vocab, device=self.device)
                one_hot[torch.arange(len(d)), torch.tensor(d)] = 1.0
                rows.append(one_hot)
        return torch.cat(rows)

    # -- the GPU path: persistent buffers, CUDA graphs -------------------------------------

    def _forward_buffered(self, ids, query_lens, seq_lens, group_tables) -> torch.Tensor | None:
        """The step's hidden states through the persistent buffers (a graph replay for a decode
        batch that fits one), or None when the step does not fit them."""
        widest = max((len(row) for tables in group_tables for row in tables), default=0)
        if not self.inputs.fits(len(ids), len(query_lens), widest):
            if not self._warned_unbuffered:
                self._warned_unbuffered = True
                logger.warning(
                    "a step of %d tokens, %d requests, block tables of %d blocks exceeds the runner's "
                    "buffers (%d, %d, %d): such steps build their inputs unbuffered, eagerly",
                    len(ids), len(query_lens), widest,
                    self.inputs.max_tokens, self.inputs.max_seqs, self.inputs.max_blocks,
                )  # fmt: skip
            return None
        size = self.graphs.size_for(query_lens) if self.graphs is not None else None
        if size is None:
            input_ids, positions, metas = self.inputs.fill(
                ids, query_lens, seq_lens, group_tables, self.batch_invariant
            )
            return self.model.forward(
                input_ids, positions, self.layer_caches, [metas[g] for g in self.layer_group]
            )
        pad = size - len(ids)
        self.inputs.fill(
            ids + [0] * pad,
            query_lens + [1] * pad,
            seq_lens + [1] * pad,
            [tables + [[self.dummy_block]] * pad for tables in group_tables],
            self.batch_invariant,
            wide=True,
        )
        return self.graphs.replay(size)[: len(ids)]

    def _pad_batch(self, size: int) -> None:
        """A batch of ``size`` padding rows in the static inputs: token 0 at position 0 of a
        one-token sequence whose only block is the dummy one."""
        self.inputs.fill(
            [0] * size,
            [1] * size,
            [1] * size,
            [[[self.dummy_block]] * size for _ in range(self.num_groups)],
            self.batch_invariant,
            wide=True,
        )

    def _static_forward(self, size: int) -> torch.Tensor:
        """The model on the static inputs' first ``size`` decode rows: what a graph captures.
        Its max_seq_len is max_model_len, an upper bound for any step it is replayed for."""
        input_ids, positions, metas = self.inputs.views(
            size, size, self.batch_invariant, 1, self.max_model_len, wide=True
        )
        layer_metas = [metas[g] for g in self.layer_group]
        return self.model.forward(input_ids, positions, self.layer_caches, layer_metas)

    def _capture_graphs(self, sizes: list[int]) -> None:
        blocker = graph_blocker(self.device.type)
        if blocker is not None:
            logger.info("CUDA graphs off, every step runs eagerly: %s", blocker)
            return
        graphs = DecodeGraphs(sizes, self._pad_batch, self._static_forward)
        with torch.inference_mode():
            if graphs.capture_all():
                graphs.verify(graphs.captured_sizes[0])
        self.graphs = graphs
        if graphs.graphs:
            logger.info("captured CUDA graphs for decode batches of %s", graphs.captured_sizes)

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


def _logprob_entries(logits: torch.Tensor, tokens: list[int], top: int) -> list[list[tuple[int, float]]]:
    """Per emitted token, its logprob and the ``top`` most likely, from the model's own
    distribution at its position (before any processing), as the plain sampler reports them."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    best = lp.topk(top) if top else None
    out = []
    for j, (tok, v) in enumerate(zip(tokens, chosen, strict=True)):
        entry = [(tok, v)]
        if best is not None:
            entry += list(zip(best.indices[j].tolist(), best.values[j].tolist(), strict=True))
        out.append(entry)
    return out
