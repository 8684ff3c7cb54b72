"""The offline API: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import msgspec
import torch

from tessera.formats import open_checkpoint
from tessera.kernels import preferred_dtype
from tessera.kvcache import (
    KV_CACHE_DTYPES,
    QUANTIZED_KV_DTYPES,
    KVCacheManager,
    KVCacheSpec,
    group_layers,
    kv_bytes_per_token,
    num_blocks_for_budget,
    plan_num_blocks,
)
from tessera.models import SupportsMultiModal, load_model
from tessera.platform import KNOWN_DEVICES, current_platform, platform_for
from tessera.sampling import SamplingParams
from tessera.scheduler import KVTransferParams, Request, RequestStatus, Scheduler, SchedulerConfig
from tessera.spec_decode import make_proposer

from .args import EngineArgs
from .draft_runner import DraftRunner, check_draft_vocabulary, checkpoint_bytes
from .engine_core import EngineCore
from .gpu_memory import gpu_kv_cache_budget
from .kv_connector import check_kv_transfer, make_kv_connector
from .model_runner import ModelRunner
from .model_source import resolve_model
from .multimodal_prompt import MultiModalInputs, MultiModalPrompter, inputs_of
from .output_processor import OutputProcessor
from .outputs import RequestOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_KV_SHARE = 0.25
_DEFAULT_KV_CAP = 4 * 2**30

# text, token ids, or vLLM's dict: {"prompt": text} or {"prompt_token_ids": ids}, with
# "multi_modal_data": {"image": an image or a list} for a vision-language model
PromptType = str | list[int] | dict


class LLM:
    def __init__(
        self,
        model: str = EngineArgs.model,
        *,
        progress: Callable[[int, int], None] | None = None,
        **engine_args,
    ) -> None:
        args = EngineArgs(model=model, **engine_args)
        self.args = args
        if args.seed is not None:
            torch.manual_seed(args.seed)
        spec = args.speculative_config
        # before any weight loads: the n-gram proposer builds its C here, or says why it can't;
        # a draft model's checkpoint opens (metadata only) and its vocabulary is checked
        proposer = make_proposer(spec) if spec is not None and spec.method != "draft_model" else None
        checkpoint = open_checkpoint(resolve_model(args.model))
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer()
        draft_checkpoint = None
        if spec is not None and spec.method == "draft_model":
            draft_checkpoint = open_checkpoint(resolve_model(spec.model))
            check_draft_vocabulary(self.tokenizer, self.config, draft_checkpoint, spec.model)
        device = _device(args.device) if args.device else current_platform().device
        if args.dtype == "auto":
            dtype = preferred_dtype(device)
        else:
            dtype = _DTYPES[args.dtype]
        if args.quantized_weights not in ("packed", "dequantize"):
            raise ValueError(
                f"quantized_weights must be 'packed' or 'dequantize', got {args.quantized_weights!r}"
            )
        self.model = load_model(
            checkpoint, dtype, device, progress=progress, packed_weights=args.quantized_weights == "packed"
        )
        self.multimodal = None  # a vision-language model's image side (multimodal_prompt.py)
        if isinstance(self.model, SupportsMultiModal):
            mrope = bool(getattr(self.model, "uses_mrope", False))
            self.multimodal = MultiModalPrompter(
                resolve_model(args.model), self.config, uses_mrope=mrope,
                limit_images=args.limit_mm_per_prompt,
                allowed_local_media_path=args.allowed_local_media_path,
                allowed_media_domains=tuple(args.allowed_media_domains),
            )  # fmt: skip
        self.draft_model = None
        if draft_checkpoint is not None:
            self.draft_model = load_model(
                draft_checkpoint,
                dtype,
                device,
                progress=progress,
                packed_weights=args.quantized_weights == "packed",
            )

        c = self.config
        kv_dtype = kv_storage_dtype(args.kv_cache_dtype, dtype)
        kv_name = args.kv_cache_dtype if args.kv_cache_dtype != "auto" else str(dtype).removeprefix("torch.")
        # layers grouped by KV kind (full, sliding window): each group has its own block tables
        # over one pool, and a block id is a page in each of the group_size tensors
        groups = group_layers(
            [KVCacheSpec(s.sliding_window, s.num_kv_heads, s.head_dim) for s in self.model.kv_cache_spec()]
        )
        self.kv_groups = groups
        per_token = kv_bytes_per_token(groups.group_size, c.num_key_value_heads, c.head_dim, kv_name)
        if self.draft_model is not None:
            if not any(g.spec.sliding_window is None for g in groups.groups):
                raise ValueError(
                    "a draft model needs a target with full-attention layers: its K/V goes at the "
                    "slots of the target's full-attention block tables, and this target has only "
                    "sliding-window layers"
                )
            # its own K/V tensors, one per layer, with as many pages as the target's pool
            per_token += sum(
                kv_bytes_per_token(1, s.num_kv_heads, s.head_dim, kv_name)
                for s in self.draft_model.kv_cache_spec()
            )
        on_gpu = torch.device(device).type == "cuda"
        budget = args.kv_cache_memory
        if budget is None and on_gpu:
            budget = gpu_kv_cache_budget(
                self.model,
                args.gpu_memory_utilization,
                args.max_num_batched_tokens,
                args.max_num_seqs,
                min(args.max_model_len or c.max_position_embeddings, args.max_num_batched_tokens),
                args.block_size,
                kv_dtype,
            )
            # the runner adds one block no request gets: padding rows of decode graphs write there
            budget -= args.block_size * per_token
        elif budget is None:
            if args.gpu_memory_utilization != EngineArgs.gpu_memory_utilization:
                logger.warning(
                    "gpu_memory_utilization=%s is ignored on %s: the KV cache takes kv_cache_memory, "
                    "by default a quarter of free memory (at most 4GiB)",
                    args.gpu_memory_utilization,
                    torch.device(device).type,
                )
            budget = min(int(platform_for(device).free_memory() * _DEFAULT_KV_SHARE), _DEFAULT_KV_CAP)
        max_model_len = args.max_model_len
        if max_model_len is None:
            max_model_len = _longest_context(
                groups,
                num_blocks_for_budget(budget, args.block_size, per_token),
                args.block_size,
                args.max_num_batched_tokens,
                c.max_position_embeddings,
            )
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {max_model_len}")
        num_blocks = plan_num_blocks(budget, args.block_size, per_token, max(max_model_len, args.block_size))
        self.max_model_len = max_model_len
        self.kv_cache_bytes = num_blocks * args.block_size * per_token
        sched_config = SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_chunked_prefill=args.enable_chunked_prefill,
            policy=args.scheduling_policy,
            # a draft model writes K/V for the k positions after the step's sampled token
            num_lookahead_tokens=spec.num_speculative_tokens if self.draft_model is not None else 0,
            max_num_encoder_input_tokens=_encoder_budget(args, self.multimodal),
        )
        kv = KVCacheManager(
            num_blocks, args.block_size, enable_caching=args.enable_prefix_caching, groups=groups
        )
        scheduler = Scheduler(sched_config, kv)
        eos = (
            *self.tokenizer.eos_token_ids,
            *c.eos_token_ids,
            *_as_tuple(checkpoint.generation_config.get("eos_token_id")),
        )
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        if self.draft_model is not None:
            draft = DraftRunner(self.draft_model, num_blocks, args.block_size, kv_dtype, args.batch_invariant)
            proposer = make_proposer(
                spec,
                draft,
                eos_token_ids=self.eos_token_ids,
                max_catch_up=args.max_num_batched_tokens,
            )
        runner = ModelRunner(
            self.model,
            num_blocks,
            args.block_size,
            kv_dtype,
            self.eos_token_ids,
            args.batch_invariant,
            groups,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=max_model_len,
            enforce_eager=args.enforce_eager,
            speculative_config=args.speculative_config,
            proposer=proposer,
            encoder_cache_bytes=args.encoder_cache_memory,
        )
        if self.draft_model is not None:
            # until measured: a drafted position costs what streaming the draft's weights does
            runner.spec_policy.draft_cost = checkpoint_bytes(draft_checkpoint) / max(
                checkpoint_bytes(checkpoint), 1
            )
        self.engine = EngineCore(scheduler, runner)
        # disaggregated prefill/decode: moves prompts' KV blocks between engines (kv_connector.py)
        self.kv_connector = make_kv_connector(args.kv_transfer_config, self)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------

    def _prepare(
        self, prompt: PromptType, params: SamplingParams
    ) -> tuple[str | None, list[int], MultiModalInputs | None]:
        images, videos = [], []
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
            if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError(
                    "a prompt dict holds 'prompt' (text) or 'prompt_token_ids', and may hold "
                    f"'multi_modal_data'; got the keys {sorted(prompt)}"
                )
            images, videos = inputs_of(prompt.get("multi_modal_data"))
            prompt = prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise ValueError("the prompt is empty")
        mm = None
        if (images or videos) and self.multimodal is None:
            raise ValueError(f"the model {self.args.model!r} takes text only: it takes no images")
        if self.multimodal is not None:  # also a text prompt: no image token without its image
            ids, mm = self.multimodal.prepare(ids, images, videos)
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, more than the maximum context length of "
                f"{self.max_model_len}"
            )
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )
        params.validate()
        params.check_vocab(self.config.vocab_size)
        if params.structured is not None:
            self.grammars().validate(params.structured)
        return text, ids, mm

    def grammars(self):
        """The structured-output compiler for this tokenizer, built on first use."""
        if self.engine.runner.grammars is None:
            from tessera.sampling import GrammarCompiler

            self.engine.runner.grammars = GrammarCompiler(
                self.tokenizer.hf.to_str(), self.tokenizer.vocab_size, self.eos_token_ids
            )
        return self.engine.runner.grammars

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Queue one request; returns its id. Refused (nothing queued) if invalid."""
        params = params or SamplingParams()
        text, ids, mm = self._prepare(prompt, params)
        return self._add(text, ids, params, priority=priority, cache_salt=cache_salt, mm=mm)

    def _add(
        self,
        text: str | None,
        ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        request_id: str | None = None,
        mm: MultiModalInputs | None = None,
        kv_transfer: KVTransferParams | None = None,
    ) -> str:
        if kv_transfer is not None and not (kv_transfer.do_remote_decode or kv_transfer.do_remote_prefill):
            kv_transfer = None  # vLLM's clients may send empty params: an ordinary request
        if kv_transfer is not None:
            check_kv_transfer(self.kv_connector, ids, params, kv_transfer, self.config.vocab_size)
        rid = request_id if request_id is not None else str(next(self._ids))
        max_tokens = params.max_tokens or (self.max_model_len - len(ids)) or 1
        encoders = self.engine.runner.encoders
        if mm is not None:
            encoders.add_inputs(rid, mm.inputs, mm.mrope)
        try:
            self._admit(rid, ids, params, max_tokens, priority, cache_salt, mm, kv_transfer)
        except BaseException:
            if mm is not None:
                encoders.stop(rid, finished=True)
            raise
        self.output_processor.add_request(rid, text, ids, params)
        return rid

    def _admit(self, rid, ids, params, max_tokens, priority, cache_salt, mm, kv_transfer=None) -> None:
        self.engine.add_request(
            Request(
                rid,
                ids,
                max_tokens=max_tokens,
                min_tokens=params.min_tokens,
                stop_token_ids=params.stop_token_ids,
                eos_token_ids=self.eos_token_ids,
                ignore_eos=params.ignore_eos,
                sampling_params=msgspec.msgpack.encode(params),  # opaque to the scheduler
                arrival_time=time.monotonic(),
                priority=priority,
                cache_salt=cache_salt,
                skip_prefix_cache=params.prompt_logprobs is not None,
                mm_features=mm.features if mm is not None else (),
                kv_transfer=kv_transfer,
            )
        )

    def abort(self, request_id: str) -> None:
        self.engine.abort_requests([request_id])
        self.output_processor.abort(request_id)

    def step(self) -> list[RequestOutput]:
        """One engine step; the outputs of requests that changed."""
        changed, to_stop = self.output_processor.process(self.engine.step())
        if to_stop:
            self.engine.abort_requests(to_stop, RequestStatus.FINISHED_STOPPED)
        return changed

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def stats(self):
        """Scheduler statistics: running, waiting, preemptions, KV usage, prefix hits."""
        return self.engine.scheduler.stats()

    def reset_prefix_cache(self) -> int:
        return self.engine.scheduler.reset_prefix_cache()

    # -- batch and streaming APIs -------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together; outputs in input order. A bad prompt or parameter is refused
        before any request starts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        prepared = [self._prepare(p, sp) for p, sp in zip(prompts, sampling_params, strict=True)]
        ids = [self._add(t, i, sp, mm=mm) for (t, i, mm), sp in zip(prepared, sampling_params, strict=True)]
        results: dict[str, RequestOutput] = {}
        try:
            while len(results) < len(ids):
                for out in self.step():
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            for rid in ids:
                if rid not in results:
                    self.abort(rid)
            raise
        return [results[r] for r in ids]

    def stream(self, prompt: PromptType, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request as it grows (``delta_text`` holds each step's new text)."""
        rid = self.add_request(prompt, params)
        done = False
        try:
            while not done:
                for out in self.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.abort(rid)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([self.tokenizer.encode_chat(messages)], params)[0]


def _longest_context(groups, num_blocks: int, block_size: int, step_tokens: int | None, limit: int) -> int:
    """The longest context (up to ``limit``) whose blocks, summed over the groups, fit in
    ``num_blocks`` (sliding groups hold only their window's)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(groups.blocks_for_context(mid, block_size, step_tokens)) <= num_blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo


def kv_storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of ``--kv-cache-dtype name`` ("auto": the model's)."""
    if name == "auto":
        return model_dtype
    if name not in QUANTIZED_KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r} (known: auto, {', '.join(QUANTIZED_KV_DTYPES)})")
    return getattr(torch, KV_CACHE_DTYPES[name].torch_name)


def _device(name: str) -> torch.device:
    if name not in KNOWN_DEVICES:
        raise ValueError(f"device {name!r} is not one of {', '.join(KNOWN_DEVICES)}")
    return torch.device("cuda" if name == "rocm" else name)  # ROCm is "cuda" to torch


def _encoder_budget(args: EngineArgs, prompter) -> int | None:
    """Image tokens a step may encode: as asked, else (as vLLM) the step's token budget, raised
    to the most tokens one input can have, so that any input fits a step of its own."""
    if args.max_num_encoder_input_tokens is not None or prompter is None:
        return args.max_num_encoder_input_tokens
    return max(args.max_num_batched_tokens, prompter.max_tokens_per_input)


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return (x,) if isinstance(x, int) else tuple(x)
