"""Engine options, named as vLLM names them, shared by every entry point."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields

from tessera.kvcache import QUANTIZED_KV_DTYPES
from tessera.spec_decode import SpeculativeConfig

from .kv_transfer_config import KVTransferConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 2**10,
    "m": 1e6,
    "mb": 1e6,
    "mib": 2**20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 2**30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """``"64MiB"`` -> 67108864; plain numbers are bytes."""
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 64MiB, 2GiB, 500MB, 1048576)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_memory_fraction(text: str | float) -> float:
    """``--gpu-memory-utilization``: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"gpu_memory_utilization {text!r} is not a number") from None
    if not 0 < value <= 1:
        raise ValueError(
            f"gpu_memory_utilization must be in (0, 1], the fraction of the GPU's memory the engine "
            f"may use; got {value}"
        )
    return value


def _speculative_config_arg(text: str) -> SpeculativeConfig:
    try:
        return SpeculativeConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kv_transfer_config_arg(text: str) -> KVTransferConfig:
    try:
        return KVTransferConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fraction_arg(text: str) -> float:
    try:
        return parse_memory_fraction(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass
class EngineArgs:
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: from gpu_memory_utilization on a GPU, else
    # a share of free memory
    gpu_memory_utilization: float = 0.9  # GPU only: the share of its total memory the engine may use
    enforce_eager: bool = False  # GPU only: no CUDA graphs
    device: str | None = None  # None: tessera.platform decides
    seed: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_dtype: str = "auto"  # auto | int8 | fp8
    scheduling_policy: str = "fcfs"  # fcfs | priority
    quantized_weights: str = "packed"  # packed | dequantize
    batch_invariant: bool = True  # a request's tokens do not depend on what runs beside it
    # JSON text, a dict or a SpeculativeConfig (vLLM's --speculative-config); None: no speculation
    speculative_config: SpeculativeConfig | str | dict | None = None
    # vision-language models: images a prompt may hold, where local images may be read from
    # (None: nowhere), hosts images may be fetched from (none: no http), the encoder's tokens
    # per step (None: max_num_batched_tokens) and the encoder cache's bytes
    limit_mm_per_prompt: int = 4
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    max_num_encoder_input_tokens: int | None = None
    encoder_cache_memory: int = 256 << 20
    # tensor parallelism: ranks (worker processes, torch.distributed: gloo on the CPU, NCCL on
    # GPUs); the executor: "uni" (this process; one rank only) or "mp" (a worker process per rank)
    tensor_parallel_size: int = 1
    # None: "uni" for one rank, else "torchrun" where torchrun started this process, else "mp"
    distributed_executor_backend: str | None = None
    # JSON text, a dict or a KVTransferConfig (vLLM's --kv-transfer-config): this engine's role in
    # disaggregated prefill/decode; None: an ordinary engine
    kv_transfer_config: KVTransferConfig | str | dict | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.distributed_executor_backend not in (None, "uni", "mp", "torchrun"):
            backend = self.distributed_executor_backend
            raise ValueError(
                f"distributed_executor_backend must be 'uni', 'mp' or 'torchrun', got {backend!r}"
            )
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} needs a process per rank: "
                "distributed_executor_backend 'mp' (the default for more than one rank)"
            )
        self.gpu_memory_utilization = parse_memory_fraction(self.gpu_memory_utilization)
        self.allowed_media_domains = tuple(self.allowed_media_domains)
        if self.limit_mm_per_prompt < 0:
            raise ValueError(f"limit_mm_per_prompt must be at least 0, got {self.limit_mm_per_prompt}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        self.kv_transfer_config = KVTransferConfig.parse(self.kv_transfer_config)
        spec = self.speculative_config
        if self.kv_transfer_config is not None and spec is not None and spec.method == "draft_model":
            raise ValueError(
                "kv_transfer_config: disaggregated serving with a draft model is not supported (the "
                "draft's K/V would have to move too); use the n-gram proposer or none"
            )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("engine")
        g.add_argument(
            "--model",
            default=EngineArgs.model,
            help="a .gguf file, an HF model folder, or a known short name (default: %(default)s)",
        )
        g.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "bfloat16", "float16"],
            help="compute dtype (auto: bfloat16 on GPUs and on CPUs with AVX512-BF16 and VNNI, "
            "float32 on other CPUs)",
        )
        g.add_argument(
            "--max-model-len",
            type=int,
            default=None,
            help="context length (default: the model's, capped by the KV cache)",
        )
        g.add_argument(
            "--max-num-seqs", type=int, default=EngineArgs.max_num_seqs, help="requests in one batch at most"
        )
        g.add_argument(
            "--max-num-batched-tokens",
            type=int,
            default=EngineArgs.max_num_batched_tokens,
            help="tokens in one step at most (longer prompts are prefilled in chunks)",
        )
        g.add_argument("--block-size", type=int, default=EngineArgs.block_size, help="tokens per KV block")
        g.add_argument(
            "--kv-cache-memory",
            type=parse_size,
            default=None,
            metavar="SIZE",
            help="bytes for the KV cache, e.g. 64MiB (default: on a GPU, what "
            "--gpu-memory-utilization leaves; on the CPU, a quarter of free memory, at most 4GiB)",
        )
        g.add_argument(
            "--gpu-memory-utilization",
            type=_fraction_arg,
            default=EngineArgs.gpu_memory_utilization,
            metavar="FRACTION",
            help="share of the GPU's total memory the engine may use, in (0, 1] (vLLM's meaning): the "
            "KV cache gets what is left after the weights and a profiled forward of "
            "--max-num-batched-tokens tokens. Ignored on the CPU, where --kv-cache-memory applies "
            "(default: %(default)s)",
        )
        g.add_argument(
            "--enforce-eager",
            action="store_true",
            help="GPU: run every step eagerly, without the CUDA graphs captured at load for decode "
            "batches of 1, 2, 4, ..., 256",
        )
        g.add_argument(
            "--kv-cache-dtype",
            default="auto",
            choices=["auto", *QUANTIZED_KV_DTYPES],
            help="KV storage: the model's dtype, or int8 / fp8 e4m3 with per-token scales",
        )
        g.add_argument(
            "--enable-prefix-caching",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="share the KV blocks of common prompt prefixes (default: on)",
        )
        g.add_argument(
            "--enable-chunked-prefill",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="split long prompts across steps (default: on)",
        )
        g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
        g.add_argument(
            "--quantized-weights",
            default=EngineArgs.quantized_weights,
            choices=["packed", "dequantize"],
            help="GGUF weights: kept packed and multiplied by the device's quantized kernels where it "
            "has them (CPU with AVX512-BF16 and VNNI: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, "
            "Q6_K), or dequantized to the compute dtype "
            "at load (default: %(default)s)",
        )
        g.add_argument(
            "--batch-invariant",
            action=argparse.BooleanOptionalAction,
            default=EngineArgs.batch_invariant,
            help="every kernel gives a token the same result whatever runs beside it, so a seeded "
            "request's tokens do not depend on the batch, the prefix cache or prompt chunking "
            "(like vLLM's VLLM_BATCH_INVARIANT). Free on the CPU's default bf16 kernels; "
            "--no-batch-invariant lets float32 and quantized-KV attention run long prompts "
            "through torch's SDPA, faster for them (default: on)",
        )
        g.add_argument(
            "--speculative-config",
            type=_speculative_config_arg,
            default=None,
            metavar="JSON",
            help='speculative decoding, as vLLM spells it: \'{"method": "ngram", '
            '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
            '(prompt lookup: drafts copied from the prompt and output). "adaptive": true (default) '
            "chooses each request's k per step from its measured acceptance and the batch size, and "
            'none where speculation would not pay; "disable_by_batch_size": N turns it off above N '
            'running requests. {"method": "draft_model", "model": "qwen2.5-coder-0.5b-instruct", ...} '
            'drafts with a smaller model of the same tokenizer; "quantization": "q4_0" re-quantizes it '
            'at load and "draft_vocab_size": 32768 cuts its LM head to the most frequent tokens (of '
            '"draft_vocab_corpus", by default the Python library\'s source). The output distribution '
            "is unchanged (exact rejection sampling)",
        )
        g.add_argument(
            "--kv-transfer-config",
            type=_kv_transfer_config_arg,
            default=None,
            metavar="JSON",
            help='disaggregated prefill/decode, as vLLM spells it: \'{"kv_role": "kv_producer", '
            '"kv_connector": "TCPConnector"}\' computes prompts and holds their KV blocks for a consumer '
            '(also "kv_ip", "kv_port": where it serves them, default 127.0.0.1 and any free port; '
            '"kv_hold_timeout": seconds they wait, default 60); "kv_consumer" decodes requests whose '
            'prompt a producer computed, pulling its blocks ("kv_transfer_timeout", default 30 s). '
            "`tessera router` sends each request to both",
        )
        g.add_argument("--device", default=None, help="cpu | cuda | rocm | xpu (default: detected)")
        g.add_argument(
            "--tensor-parallel-size", "-tp", type=int, default=EngineArgs.tensor_parallel_size, metavar="N",
            help="split the model over N ranks, a worker process each (torch.distributed: gloo on the "
            "CPU, NCCL on GPUs): attention heads, MLP and vocabulary are divided, each rank holds "
            "its share of the weights and the KV cache (default: %(default)s)",
        )  # fmt: skip
        g.add_argument(
            "--distributed-executor-backend", choices=["uni", "mp", "torchrun"], default=None,
            help="uni: the model runs in this process (one rank); mp: a worker process per rank, "
            "talking to the engine through pipes; torchrun: every process torchrun started is a "
            "rank (across machines: --nnodes/--node-rank/--master-addr), rank 0 runs the engine "
            "and sends each step to the others (default: uni for one rank, else torchrun under "
            "torchrun, else mp)",
        )  # fmt: skip
        m = parser.add_argument_group("images (vision-language models)")
        m.add_argument(
            "--limit-mm-per-prompt", type=int, default=EngineArgs.limit_mm_per_prompt, metavar="N",
            help="images one prompt may hold (default: %(default)s)",
        )  # fmt: skip
        m.add_argument(
            "--allowed-local-media-path", default=None, metavar="DIR",
            help="image paths and file:// URLs are read only under this folder (default: none are)",
        )  # fmt: skip
        m.add_argument(
            "--allowed-media-domains", nargs="*", default=(), metavar="HOST",
            help="hosts whose http(s) image URLs may be fetched (default: none, as vLLM)",
        )  # fmt: skip
        m.add_argument(
            "--max-num-encoder-input-tokens", type=int, default=None, metavar="N",
            help="image tokens the vision encoder may take in one step (default: --max-num-batched-tokens)",
        )  # fmt: skip

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> EngineArgs:
        """The engine options of a parsed command line (each is an attribute of the same name)."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
