"""The offline API: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

import itertools
import logging
import os
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
from tessera.models import SupportsMultiModal, TPInfo, model_class
from tessera.platform import KNOWN_DEVICES, current_platform, platform_for
from tessera.sampling import SamplingParams
from tessera.scheduler import KVTransferParams, Request, RequestStatus, Scheduler, SchedulerConfig
from tessera.spec_decode import make_proposer

from .args import EngineArgs
from .draft_runner import check_draft_vocabulary
from .engine_core import EngineCore
from .executor import (
    ControlChannel,
    MultiprocExecutor,
    TorchrunExecutor,
    UniprocExecutor,
    serve_torchrun_steps,
    torchrun_rank,
)
from .gpu_memory import gpu_kv_cache_budget
from .kv_connector import check_kv_transfer, make_kv_connector
from .model_source import resolve_model
from .multimodal_prompt import MultiModalInputs, MultiModalPrompter, inputs_of
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .worker import RunnerPlan, build_runner, engine_args_dict, load_models, worker_threads

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
        if spec is not None and spec.quantization is not None and args.quantized_weights != "packed":
            raise ValueError(
                "speculative_config.quantization re-quantizes the draft for the packed kernels: it "
                "needs --quantized-weights packed (the dequantized path would only lose precision)"
            )
        tp_size = _suite_tp_size(args, self.config)
        backend = args.distributed_executor_backend or _default_backend(tp_size)
        if tp_size > 1:  # before any process starts or weight loads
            from tessera.models import check_tensor_parallel

            check_tensor_parallel(self.config, tp_size)
        on_gpu = torch.device(device).type == "cuda"
        self.tensor_parallel_size = tp_size
        self.model = self.draft_model = None  # in this process only with the "uni" executor
        self.multimodal = None  # a vision-language model's image side (multimodal_prompt.py)
        if backend != "uni" and args.kv_transfer_config is not None:
            raise ValueError(
                "disaggregated prefill/decode (--kv-transfer-config) moves the KV blocks of an "
                "engine whose model runs in its own process: --tensor-parallel-size 1 and "
                "--distributed-executor-backend uni"
            )
        executor = None
        torchrun = None  # (rank, world size, control channel) when torchrun started the ranks
        if backend != "uni" and hasattr(model_class(self.config.architecture), "embed_multimodal"):
            raise ValueError(
                f"{args.model!r} is a vision-language model: it runs in one process "
                "(--tensor-parallel-size 1, --distributed-executor-backend uni)"
            )
        if backend == "torchrun":
            torchrun, device = _join_torchrun(tp_size, device)
            self.model, self.draft_model = load_models(
                args, checkpoint, draft_checkpoint, dtype, device, TPInfo(torchrun[0], tp_size),
                progress if torchrun[0] == 0 else None,
            )  # fmt: skip
            specs = self.model.kv_cache_spec()
            draft_specs = self.draft_model.kv_cache_spec() if self.draft_model is not None else []
        elif backend == "mp":
            executor = MultiprocExecutor(
                engine_args_dict(args),
                tp_size,
                str(device),
                str(dtype).removeprefix("torch."),
                worker_threads(tp_size),
            )
            specs = [s.spec() for s in executor.loaded[0].kv_specs]
            draft_specs = [s.spec() for s in executor.loaded[0].draft_kv_specs]
        else:
            self.model, self.draft_model = load_models(
                args, checkpoint, draft_checkpoint, dtype, device, TPInfo(), progress
            )
            if isinstance(self.model, SupportsMultiModal):
                mrope = bool(getattr(self.model, "uses_mrope", False))
                self.multimodal = MultiModalPrompter(
                    resolve_model(args.model), self.config, uses_mrope=mrope,
                    limit_images=args.limit_mm_per_prompt,
                    allowed_local_media_path=args.allowed_local_media_path,
                    allowed_media_domains=tuple(args.allowed_media_domains),
                )  # fmt: skip
            specs = self.model.kv_cache_spec()
            draft_specs = self.draft_model.kv_cache_spec() if self.draft_model is not None else []

        c = self.config
        kv_dtype = kv_storage_dtype(args.kv_cache_dtype, dtype)
        kv_name = args.kv_cache_dtype if args.kv_cache_dtype != "auto" else str(dtype).removeprefix("torch.")
        # layers grouped by KV kind (full, sliding window): each group has its own block tables
        # over one pool, and a block id is a page in each of the group_size tensors. With tensor
        # parallelism these are one rank's (its share of the KV heads): every rank has as many
        # blocks, each of its own heads.
        groups = group_layers([KVCacheSpec(s.sliding_window, s.num_kv_heads, s.head_dim) for s in specs])
        self.kv_groups = groups
        per_token = kv_bytes_per_token(groups.group_size, specs[0].num_kv_heads, specs[0].head_dim, kv_name)
        if draft_specs:
            if not any(g.spec.sliding_window is None for g in groups.groups):
                raise ValueError(
                    "a draft model needs a target with full-attention layers: its K/V goes at the "
                    "slots of the target's full-attention block tables, and this target has only "
                    "sliding-window layers"
                )
            # its own K/V tensors, one per layer, with as many pages as the target's pool
            per_token += sum(kv_bytes_per_token(1, s.num_kv_heads, s.head_dim, kv_name) for s in draft_specs)
        budget = args.kv_cache_memory  # one rank's
        if budget is None and on_gpu:
            if isinstance(executor, MultiprocExecutor):
                budget = min(w.kv_budget for w in executor.loaded)
            else:
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
            # the ranks of one machine share its memory
            budget = min(int(platform_for(device).free_memory() * _DEFAULT_KV_SHARE), _DEFAULT_KV_CAP)
            budget //= int(os.environ.get("LOCAL_WORLD_SIZE", tp_size)) if torchrun else tp_size
        if torchrun is not None:  # every rank plans from the smallest: the same blocks everywhere
            budget = _smallest(budget, torchrun[2])
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
        self.kv_cache_bytes = num_blocks * args.block_size * per_token  # per rank
        sched_config = SchedulerConfig(
            max_model_len=max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_chunked_prefill=args.enable_chunked_prefill,
            policy=args.scheduling_policy,
            # a draft model writes K/V for the k positions after the step's sampled token
            num_lookahead_tokens=spec.num_speculative_tokens if draft_specs else 0,
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
        if isinstance(executor, MultiprocExecutor):
            executor.start_runners(
                RunnerPlan(
                    num_blocks, max_model_len, str(kv_dtype).removeprefix("torch."), list(self.eos_token_ids)
                )
            )
        else:
            runner = build_runner(
                args,
                self.model,
                self.draft_model,
                draft_checkpoint,
                checkpoint,
                groups,
                num_blocks,
                kv_dtype,
                self.eos_token_ids,
                max_model_len,
                proposer,
                TPInfo(torchrun[0], tp_size) if torchrun else TPInfo(),
            )
            if torchrun is None:
                executor = UniprocExecutor(runner)
            elif torchrun[0] == 0:
                executor = TorchrunExecutor(runner, torchrun[2], tp_size)
            else:  # ranks 1..: run rank 0's steps until it stops, then end this process
                serve_torchrun_steps(runner, torchrun[2], torchrun[0])
                raise SystemExit(0)
        self.device, self.dtype = torch.device(device), dtype  # rank 0's device
        self._grammars = None
        self.engine = EngineCore(scheduler, executor)
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
        """The structured-output compiler for this tokenizer, built on first use (shared with the
        in-process runner; a worker's rank 0 builds its own)."""
        if self._grammars is None:
            from tessera.sampling import GrammarCompiler

            self._grammars = GrammarCompiler(
                self.tokenizer.hf.to_str(), self.tokenizer.vocab_size, self.eos_token_ids
            )
            if self.engine.runner is not None:
                self.engine.runner.grammars = self._grammars
        return self._grammars

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
        encoders = self.engine.runner.encoders if mm is not None else None
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

    def shutdown(self) -> None:
        """Stop the worker processes, if any (also done at exit)."""
        self.engine.shutdown()

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


def _default_backend(tp_size: int) -> str:
    """One rank: this process; several: torchrun's processes where it started this one, else
    worker processes of ours."""
    if tp_size == 1:
        return "uni"
    return "torchrun" if torchrun_rank() is not None else "mp"


def _join_torchrun(tp_size: int, device: torch.device):
    """Join the torch.distributed group torchrun set up: ``((rank, world, channel), device)``."""
    import torch.distributed as dist

    where = torchrun_rank()
    if where is None:
        raise ValueError(
            "distributed_executor_backend 'torchrun' needs the environment torchrun sets (RANK, "
            "WORLD_SIZE, MASTER_ADDR, MASTER_PORT): start with `torchrun --nproc-per-node N ...`"
        )
    rank, world = where
    if world != tp_size:
        raise ValueError(
            f"torchrun started {world} processes but --tensor-parallel-size is {tp_size}: they must be equal"
        )
    if torch.device(device).type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return (rank, world, ControlChannel()), device


def _smallest(value: int, channel) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=channel.group)
    return int(t.item())


def _suite_tp_size(args: EngineArgs, config) -> int:
    """``args.tensor_parallel_size``; or, where it is left at 1 and the executor unset, the
    environment's ``TESSERA_TENSOR_PARALLEL_SIZE`` if the model splits that way (how the test
    suite's engine tests run at several ranks where the model allows)."""
    n = os.environ.get("TESSERA_TENSOR_PARALLEL_SIZE")
    if not n or args.tensor_parallel_size != 1 or args.distributed_executor_backend is not None:
        return args.tensor_parallel_size
    from tessera.models import tensor_parallel_sizes

    size = int(n)
    if size in tensor_parallel_sizes(config, max_size=size):
        return size
    logger.info("TESSERA_TENSOR_PARALLEL_SIZE=%d: this model does not split so; one rank", size)
    return 1


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
