"""What one tensor-parallel rank runs: its share of the model, its runner, a loop on the step
messages of the engine core.

The same functions build the in-process runner (``LLM``, one rank) and a worker process's
(``MultiprocExecutor``, one per rank). A worker starts in two phases, as vLLM's do: it loads its
weights and reports what its KV cache needs and may take; the engine core plans the cache for all
ranks (the same number of blocks everywhere) and sends the plan; the worker builds its runner and
then answers one message per step: a ``SchedulerOutput`` in, a ``StepReply`` out. Everything on
the pipe is msgspec bytes; no tensor is pickled.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from dataclasses import asdict

import msgspec
import torch

from tessera.formats import open_checkpoint
from tessera.kvcache import KVCacheSpec
from tessera.models import TPInfo, load_model
from tessera.models.parallel import NO_TP
from tessera.scheduler import ModelRunnerOutput, SchedulerOutput
from tessera.spec_decode import make_proposer

from .args import EngineArgs
from .draft_runner import DraftRunner, checkpoint_bytes, draft_load_options
from .model_runner import ModelRunner
from .model_source import resolve_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WorkerInit(msgspec.Struct):
    """What a worker process is started with (msgspec bytes on its command pipe)."""

    args: dict  # EngineArgs' fields
    rank: int
    world_size: int
    init_method: str  # torch.distributed rendezvous, e.g. tcp://127.0.0.1:PORT
    backend: str  # gloo | nccl
    device: str
    dtype: str  # a DTYPES key
    threads: int


class LayerSpec(msgspec.Struct, array_like=True):
    sliding_window: int | None
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, s: KVCacheSpec) -> LayerSpec:
        return cls(s.sliding_window, s.num_kv_heads, s.head_dim)

    def spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.sliding_window, self.num_kv_heads, self.head_dim)


class WorkerLoaded(msgspec.Struct):
    """Phase one's answer: the rank's KV layout and, on a GPU, the bytes its cache may take."""

    kv_specs: list[LayerSpec]
    draft_kv_specs: list[LayerSpec]
    kv_budget: int | None


class RunnerPlan(msgspec.Struct):
    """Phase two: the cache every rank allocates and what its runner needs to know."""

    num_blocks: int
    max_model_len: int
    kv_dtype: str  # a torch dtype's name, e.g. "bfloat16", "int8"
    eos_token_ids: list[int]


class StepReply(msgspec.Struct, omit_defaults=True):
    """A worker's answer to one message: rank 0's runner output (msgpack of ModelRunnerOutput),
    or an error; other ranks answer with neither."""

    output: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil: no output
    error: str | None = None

    @property
    def has_output(self) -> bool:
        return bytes(self.output) != b"\xc0"


SHUTDOWN = b""  # sent instead of a step: finish and exit


def engine_args_dict(args: EngineArgs) -> dict:
    d = asdict(args)
    spec = args.speculative_config
    d["speculative_config"] = None if spec is None else msgspec.to_builtins(spec)
    d["allowed_media_domains"] = list(args.allowed_media_domains)
    return d


# -- shared with LLM ---------------------------------------------------------------------------


def load_models(args: EngineArgs, checkpoint, draft_checkpoint, dtype, device, tp: TPInfo, progress=None):
    """The target model (this rank's share) and the draft model (whole on every rank: each
    rank's runner verifies the same drafts)."""
    packed = args.quantized_weights == "packed"
    model = load_model(checkpoint, dtype, device, progress=progress, packed_weights=packed, tp=tp)
    draft = None
    if draft_checkpoint is not None:
        extra = draft_load_options(args.speculative_config, draft_checkpoint)
        draft = load_model(draft_checkpoint, dtype, device, progress=progress, packed_weights=packed, **extra)
    return model, draft


def build_runner(
    args: EngineArgs,
    model,
    draft_model,
    draft_checkpoint,
    checkpoint,
    groups,
    num_blocks: int,
    kv_dtype: torch.dtype,
    eos_token_ids: tuple[int, ...],
    max_model_len: int,
    proposer=None,
    tp: TPInfo = NO_TP,
) -> ModelRunner:
    """The runner of one rank. Only rank 0 proposes drafts (its tokens are the step's: the other
    ranks take them from it)."""
    spec = args.speculative_config
    driver = tp.rank == 0
    if spec is not None and driver:
        if draft_model is not None:
            draft = DraftRunner(draft_model, num_blocks, args.block_size, kv_dtype, args.batch_invariant)
            proposer = make_proposer(
                spec, draft, eos_token_ids=eos_token_ids, max_catch_up=args.max_num_batched_tokens
            )
        elif proposer is None:
            proposer = make_proposer(spec)
    runner = ModelRunner(
        model,
        num_blocks,
        args.block_size,
        kv_dtype,
        eos_token_ids,
        args.batch_invariant,
        groups,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len,
        enforce_eager=args.enforce_eager,
        speculative_config=spec,
        proposer=proposer,
        encoder_cache_bytes=args.encoder_cache_memory,
        tp=tp,
    )
    if draft_model is not None and runner.spec_policy is not None:
        # until measured: a drafted position costs what streaming the draft's weights does
        target = max(checkpoint_bytes(checkpoint), 1)
        runner.spec_policy.draft_cost = checkpoint_bytes(draft_checkpoint) / target
    return runner


# -- the worker process ------------------------------------------------------------------------


def worker_main(init_bytes: bytes, conn) -> None:
    """A worker process: ``conn`` is its end of the pipe to the engine core."""
    from tessera.kvcache import group_layers

    from .gpu_memory import gpu_kv_cache_budget

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine core decides when workers stop
    init = msgspec.msgpack.decode(init_bytes, type=WorkerInit)
    torch.set_num_threads(init.threads)
    args = EngineArgs(**init.args)
    # every rank samples nothing of its own (rank 0's tokens are broadcast), but a seed keeps
    # anything random at load the same everywhere
    torch.manual_seed(args.seed if args.seed is not None else 0)
    tp = TPInfo(init.rank, init.world_size)
    device = torch.device(init.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        init.backend, init_method=init.init_method, rank=init.rank, world_size=init.world_size
    )
    try:
        dtype = DTYPES[init.dtype]
        checkpoint = open_checkpoint(resolve_model(args.model))
        spec = args.speculative_config
        draft_checkpoint = None
        if spec is not None and spec.method == "draft_model":
            draft_checkpoint = open_checkpoint(resolve_model(spec.model))
        model, draft_model = load_models(args, checkpoint, draft_checkpoint, dtype, device, tp)
        budget = None
        if device.type == "cuda" and args.kv_cache_memory is None:
            c = checkpoint.config
            kv_dtype_guess = dtype if args.kv_cache_dtype == "auto" else torch.int8
            budget = gpu_kv_cache_budget(
                model,
                args.gpu_memory_utilization,
                args.max_num_batched_tokens,
                args.max_num_seqs,
                min(args.max_model_len or c.max_position_embeddings, args.max_num_batched_tokens),
                args.block_size,
                kv_dtype_guess,
            )
        loaded = WorkerLoaded(
            [LayerSpec.of(s) for s in model.kv_cache_spec()],
            [LayerSpec.of(s) for s in draft_model.kv_cache_spec()] if draft_model is not None else [],
            budget,
        )
        conn.send_bytes(msgspec.msgpack.encode(loaded))
        plan = msgspec.msgpack.decode(conn.recv_bytes(), type=RunnerPlan)
        groups = group_layers([s.spec() for s in loaded.kv_specs])
        runner = build_runner(
            args,
            model,
            draft_model,
            draft_checkpoint,
            checkpoint,
            groups,
            plan.num_blocks,
            getattr(torch, plan.kv_dtype),
            tuple(plan.eos_token_ids),
            plan.max_model_len,
            tp=tp,
        )
        tokenizer = checkpoint.tokenizer() if init.rank == 0 else None
        if tokenizer is not None:
            runner.grammar_factory = lambda: _grammars(tokenizer, plan.eos_token_ids)
        conn.send_bytes(msgspec.msgpack.encode(StepReply()))
    except BaseException as e:
        _reply_error(conn, f"rank {init.rank} failed to start: {type(e).__name__}: {e}")
        logger.error("worker rank %d failed to start:\n%s", init.rank, traceback.format_exc())
        return
    _serve_steps(runner, conn, init.rank)
    torch.distributed.destroy_process_group()


def _grammars(tokenizer, eos_token_ids):
    from tessera.sampling import GrammarCompiler

    return GrammarCompiler(tokenizer.hf.to_str(), tokenizer.vocab_size, tuple(eos_token_ids))


_decode_step = msgspec.msgpack.Decoder(SchedulerOutput).decode


def _serve_steps(runner: ModelRunner, conn, rank: int) -> None:
    encode = msgspec.msgpack.Encoder().encode
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the engine core is gone
            return
        if data == SHUTDOWN:
            return
        msg = _decode_step(data)
        try:
            out = runner.execute_model(msg)
        except Exception as e:
            logger.error("worker rank %d: the step failed:\n%s", rank, traceback.format_exc())
            _reply_error(conn, f"{type(e).__name__}: {e}")
            continue
        reply = StepReply(msgspec.Raw(encode(out))) if rank == 0 else StepReply()
        try:
            conn.send_bytes(encode(reply))
        except (BrokenPipeError, OSError):
            return


def _reply_error(conn, message: str) -> None:
    try:
        conn.send_bytes(msgspec.msgpack.encode(StepReply(error=message)))
    except (BrokenPipeError, OSError):
        pass


def decode_runner_output(raw: msgspec.Raw) -> ModelRunnerOutput:
    return msgspec.msgpack.decode(raw, type=ModelRunnerOutput)


def worker_threads(world_size: int) -> int:
    """Compute threads per worker: the cores this process may use, shared evenly."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // world_size)
