"""``tessera recommend``: which quantized variant of a model fits a device, and how well it runs.

For each candidate (EXL2 at a ladder of bits per weight, GPTQ 4-bit, GGUF schemes, the model as
given and any converted variants named with ``--variant``; each with a KV cache in the model's
dtype, fp8 or int8) it reports:

- **memory**, in four measured parts:
  - *runtime*: this process before any weight is loaded (Python, torch, the kernel libraries;
    on a GPU, the driver's share outside torch);
  - *weights* as the device's backend holds them: every distinct linear shape of the model is
    prepared through the backend's own ``prepare_linear_weight`` in the candidate's layout
    (zero-filled blocks: the held size does not depend on the values) and its bytes counted,
    on a slice of 256 output rows scaled to the whole (the layouts are per 16 rows);
  - *KV*: blocks for ``batch`` sequences of ``context`` tokens at the cache dtype;
  - *activations*: the peak above weights and cache of one forward of the largest step the
    engine takes at that context and batch (a prefill of ``min(max_num_batched_tokens,
    batch * context)`` tokens plus the logits of ``batch`` rows), run with the given model on
    a throwaway cache (CPU: the process's resident high-water mark; GPU: torch's peak);
- whether it fits the device's free memory (or ``--memory``), and the longest context that
  fits at that batch;
- **decode speed** expected from the device's measured read bandwidth: the bytes one
  single-stream token reads (held linear weights and LM head, one embedding row, the KV cache
  at ``context``) over the bandwidth a plain streaming read reaches now. It is a ceiling:
  measured decode on this machine reaches 60-90% of it (BENCHMARKS.md);
- **quality** where a measurement exists: the KL divergence or perplexity ``tessera eval``
  measured for a variant (``--eval eval.json``).

Rules for the layouts of variants that do not exist yet (how exllamav2, GPTQModel and llama.cpp
write them): EXL2 at ``b`` bpw holds its linears as groups of ``floor(b)`` and ``floor(b) + 1``
bits in the shares that average ``b``, the LM head at 6 bits, the embedding in the model dtype;
GPTQ keeps the embedding in the model dtype and the LM head too, or quantizes the head to 8 bits
(GPTQModel's ``lm_head=True``, ``tessera convert --lm-head``); a GGUF scheme quantizes every linear, the
embedding and the LM head with it (a K-quant tensor whose rows are not whole 256-blocks takes
llama.cpp's fallback type). With packed weights each backend multiplies those as GGUF
blocks (``GroupQuant.blocks``: groups of up to 4 bits in Q4_1 containers, 5 bits in Q5_1, 6-8
in Q8_0), so the held bytes are what that costs on the device, not the file's size.
"""

from __future__ import annotations

import gc
import json
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tessera.formats import BLOCK_LAYOUT, QuantizedTensor, open_checkpoint
from tessera.formats.grouped import container
from tessera.kernels import InputSegments, RowStack, ops
from tessera.kvcache.memory import kv_bytes_per_token
from tessera.platform import platform_for

from .model_source import resolve_model

EXL2_LADDER = (2.5, 3.0, 3.5, 4.0, 4.25, 4.65, 5.0, 6.0, 8.0)
GGUF_SCHEMES = ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
KV_CHOICES = ("auto", "fp8", "int8")
SLICE_ROWS = 256
EXL2_HEAD_BITS = 6
# llama.cpp's type for a K-quant tensor whose rows are not whole 256-blocks (llama-quant.cpp)
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class Layout:
    """How a variant stores its weights: ``linears`` as shares of GGUF container schemes (or
    ``"dense"``), and the LM head and embedding each one scheme or ``"dense"``."""

    linears: tuple[tuple[str, float], ...]
    head: str
    embedding: str


@dataclass
class Row:
    label: str
    kind: str  # exl2 | gptq | gguf | given
    bpw: float  # stored bits per weight of the linear layers
    kv: str
    weights: int
    kv_bytes: int
    activations: int
    runtime: int
    total: int = 0
    fits: bool = False
    max_context: int = 0
    decode_tok_s: float = 0.0
    quality: dict = field(default_factory=dict)
    path: str | None = None


# -- layouts -----------------------------------------------------------------------------------


def exl2_layout(bpw: float) -> Layout:
    lo = math.floor(bpw)
    hi_share = bpw - lo
    shares: dict[str, float] = {}
    for bits, share in ((lo, 1 - hi_share), (lo + 1, hi_share)):
        if share > 0:
            scheme = container(min(bits, 8))
            shares[scheme] = shares.get(scheme, 0.0) + share
    return Layout(tuple(shares.items()), container(EXL2_HEAD_BITS), "dense")


def gguf_layout(scheme: str) -> Layout:
    return Layout(((scheme, 1.0),), scheme, scheme)


GPTQ_LAYOUT = Layout((("Q4_1", 1.0),), "dense", "dense")
GPTQ_HEAD8_LAYOUT = Layout((("Q4_1", 1.0),), "Q8_0", "dense")  # 8-bit symmetric groups: Q8_0 blocks


def _linear_shapes(config) -> list[tuple[int, int, int, int]]:
    """(out, in, count, read per token) of the decoder's linears, q|k|v and gate|up stacked as
    the model runs them; a MoE's expert matrices count once per expert and are read for the
    ``num_experts_per_tok`` a token routes to."""
    c = config
    h, layers = c.hidden_size, c.num_hidden_layers
    q = c.num_attention_heads * c.head_dim
    shapes = [(q + 2 * c.num_key_value_heads * c.head_dim, h, layers, layers), (h, q, layers, layers)]
    experts = getattr(c, "num_experts", 0)
    if experts:
        inter, active = c.moe_intermediate_size, layers * c.num_experts_per_tok
        shapes += [(2 * inter, h, layers * experts, active), (h, inter, layers * experts, active)]
    else:
        inter = c.intermediate_size
        shapes += [(2 * inter, h, layers, layers), (h, inter, layers, layers)]
    return shapes


def _nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    if isinstance(w, RowStack):
        return sum(_nbytes(p) for p in w.parts)
    if isinstance(w, InputSegments):
        perm = 0 if w.perm is None else _nbytes(w.perm)
        return perm + sum(_nbytes(p) for _, _, p in w.parts)
    return int(w.nbytes)


class HeldBytes:
    """Bytes the backend on ``device`` holds for a matrix in a scheme, measured by preparing a
    zero-filled slice of it (cached per scheme and shape)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._cache: dict[tuple, int] = {}

    def __call__(self, scheme: str, n_out: int, n_in: int) -> int:
        if scheme in K_FALLBACK and n_in % BLOCK_LAYOUT[scheme][0]:
            scheme = K_FALLBACK[scheme]
        key = (scheme, n_out, n_in)
        if key not in self._cache:
            rows = min(n_out, SLICE_ROWS)
            if scheme == "dense" or n_in % BLOCK_LAYOUT[scheme][0]:
                held = rows * n_in * torch.empty(0, dtype=self.dtype).element_size()
            else:
                block, size = BLOCK_LAYOUT[scheme]
                data = torch.zeros(rows, n_in // block * size, dtype=torch.uint8)
                qt = QuantizedTensor(scheme, data, (rows, n_in))
                held = _nbytes(ops.prepare_linear_weight(qt.to(self.device), self.dtype))
            self._cache[key] = held * n_out // rows
        return self._cache[key]


def weight_bytes(config, layout: Layout, held: HeldBytes) -> tuple[int, int]:
    """(bytes held, bytes one decode token reads) for ``config``'s weights in ``layout``."""
    total = read = 0
    for n_out, n_in, count, active in _linear_shapes(config):
        one = sum(share * held(s, n_out, n_in) for s, share in layout.linears)
        total += int(one * count)
        read += int(one * active)
    head = held(layout.head, config.vocab_size, config.hidden_size)
    embed = held(layout.embedding, config.vocab_size, config.hidden_size)
    if config.tie_word_embeddings and layout.head == layout.embedding:
        total += head
    else:
        total += head + embed
    read += head + embed // config.vocab_size
    return total, read


def kv_bytes(config, kv: str, dtype: torch.dtype, tokens: int, block_size: int = 16) -> tuple[int, int]:
    """(bytes of the KV cache for ``tokens`` tokens in whole blocks, bytes per token)."""
    c = config
    name = str(dtype).removeprefix("torch.") if kv == "auto" else kv
    per_token = kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, name)
    return per_token * -(-tokens // block_size) * block_size, per_token


# -- measurements ---------------------------------------------------------------------------------


def resident_bytes(key: str = "VmRSS") -> int:
    """This process's resident memory (or its high-water mark: ``VmHWM``), from /proc."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def reset_peak() -> None:
    """Start the resident high-water mark afresh (Linux: ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def read_bandwidth(device: torch.device, mb: int = 512, runs: int = 7) -> float:
    """Bytes/s of a plain streaming read of a buffer far larger than the caches, median of runs."""
    x = torch.ones(mb * (1 << 20) // 4, dtype=torch.float32, device=device)
    x.sum()
    rates = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(x.numel() * 4 / (time.perf_counter() - t))
    return statistics.median(rates)


@torch.inference_mode()
def activation_bytes(model, tokens: int, seqs: int, context: int, block_size: int, kv_dtype) -> int:
    """Peak bytes above weights and cache of one forward of ``tokens`` prompt tokens (sequences of
    at most ``context``) and the logits of ``seqs`` rows, on a throwaway cache."""
    from tessera.models import LayerKVCache, build_attention_metadata

    from .gpu_memory import profile_tables

    device = model.device
    lens, tables, nxt = profile_tables(tokens, context, block_size)
    spec = model.kv_cache_spec()[0]
    cache = LayerKVCache.allocate(nxt, block_size, spec.num_kv_heads, spec.head_dim, kv_dtype, device)
    positions, metas = build_attention_metadata(lens, lens, [tables], block_size, device)
    ids = torch.zeros(tokens, dtype=torch.int64, device=device)
    n_layers = len(model.kv_cache_spec())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak()
        base = resident_bytes()
    hidden = model.forward(ids, positions, [cache] * n_layers, metas[0])
    logits = model.compute_logits(hidden[-min(seqs, tokens) :])
    torch.softmax(logits.float(), dim=-1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resident_bytes("VmHWM")
    return max(0, peak - base)


# -- the recommendation ---------------------------------------------------------------------------


@dataclass
class Recommendation:
    model: str
    device: str
    memory: int  # bytes the variants may use
    memory_source: str  # "free" | "--memory"
    context: int
    batch: int
    bandwidth: float  # bytes/s
    runtime: int
    activations: int
    rows: list[Row]
    choice: Row | None

    def sentence(self) -> str:
        if self.choice is None:
            smallest = min(self.rows, key=lambda r: r.total)
            return (
                f"nothing fits in {_gib(self.memory)} at {self.context} tokens x batch {self.batch}: the "
                f"smallest, {smallest.label} with a {smallest.kv} cache, needs {_gib(smallest.total)}"
            )
        c = self.choice
        cache = "a cache in the model's dtype" if c.kv == "auto" else f"an {c.kv} cache"
        return (
            f"{c.label} with {cache}: {c.max_context:,} tokens of context at batch {self.batch} "
            f"({_gib(c.total)} at {self.context:,} tokens; about {c.decode_tok_s:.0f} tokens/s at most)"
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["recommendation"] = self.sentence()
        return d


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


_EVAL_FIELDS = {"kl_divergence": "kl", "perplexity": "perplexity", "top1_agreement": "top1",
                "last_word_accuracy": "last_word"}  # fmt: skip


def _quality(evals: dict, label: str, path: str | None) -> dict:
    """What ``tessera eval`` measured for this variant (its eval.json), matched by path or name."""
    for m in evals.get("models", []):
        same_path = path is not None and str(Path(m.get("path", "")).resolve()) == str(Path(path).resolve())
        if same_path or m.get("model") in (label, path):
            return {short: m[key] for key, short in _EVAL_FIELDS.items() if m.get(key) is not None}
    return {}


def recommend(
    model: str,
    device: str = "cpu",
    memory: int | None = None,
    context: int = 4096,
    batch: int = 1,
    variants: list[str] = (),
    evals: dict | None = None,
    max_num_batched_tokens: int = 2048,
    block_size: int = 16,
    candidates: str = "all",
    progress=None,
) -> Recommendation:
    """Measures and ranks the candidates (module docstring); ``candidates`` "given" keeps only the
    model and ``variants`` (files that exist: their weights are loaded and counted, not derived).
    The runtime part is this process's resident memory: call it from a fresh process (the
    ``tessera recommend`` command is one), not from one that has run other work."""
    from tessera.kernels import preferred_dtype

    if context < 1 or batch < 1:
        raise ValueError(f"context ({context}) and batch ({batch}) must be at least 1")
    dev = torch.device(device)
    plat = platform_for(dev)
    dtype = preferred_dtype(dev)
    source = resolve_model(model)
    ck = open_checkpoint(source)
    config = ck.config
    # the runtime as the engine has it: tokenizer loaded, the backend's kernel library loaded
    ck.tokenizer()
    held = HeldBytes(dev, dtype)
    held("Q4_0", 16, 32)
    runtime = resident_bytes()  # on a GPU, measured below once the forward has loaded its kernels
    if context > config.max_position_embeddings:
        raise ValueError(
            f"context {context} is beyond the model's {config.max_position_embeddings} positions"
        )
    loaded, given_weights = _load_measured(source, dtype, dev)
    tokens = min(max_num_batched_tokens, batch * context)
    activations = activation_bytes(loaded, tokens, batch, context, block_size, dtype)
    bandwidth = read_bandwidth(dev)
    given = (_bpw(loaded), given_weights, decode_weight_bytes(loaded))
    del loaded  # before free memory is read: the variants will not run beside it
    gc.collect()
    if dev.type == "cuda":
        runtime, free = _device_runtime_and_free(dev, plat)
    else:
        free = plat.free_memory() + runtime
    memory_limit = memory if memory is not None else free

    rows: list[Row] = []

    def add(label: str, kind: str, bpw: float, weights: int, read: int, path: str | None = None) -> None:
        for kv in KV_CHOICES:
            kvb, per_token = kv_bytes(config, kv, dtype, batch * context, block_size)
            total = runtime + weights + kvb + activations
            room = (memory_limit - runtime - weights - activations) // max(1, per_token * batch)
            rows.append(
                Row(
                    label, kind, round(bpw, 3), kv, weights, kvb, activations, runtime, total,
                    fits=total <= memory_limit,
                    max_context=int(max(0, min(room, config.max_position_embeddings))),
                    decode_tok_s=bandwidth / (read + kvb // batch),
                    quality=_quality(evals or {}, label, path), path=path,
                )
            )  # fmt: skip

    add(f"{Path(str(source)).name} (as given)", "given", given[0], given[1], given[2], str(source))
    for v in variants:
        m, w = _load_measured(v, dtype, dev)
        shape = lambda c: (c.hidden_size, c.num_hidden_layers, c.vocab_size)  # noqa: E731
        if shape(m.config) != shape(config):
            raise ValueError(f"--variant {v} is not a variant of {model}: its shapes differ")
        add(f"{Path(v).name}", "given", _bpw(m), w, decode_weight_bytes(m), v)
        del m
    if candidates == "all":
        ladder = [(f"EXL2 {b} bpw", "exl2", b, exl2_layout(b)) for b in EXL2_LADDER]
        ladder.append(("GPTQ 4-bit g128", "gptq", 4.125, GPTQ_LAYOUT))
        ladder.append(("GPTQ 4-bit g128, 8-bit head", "gptq", 4.125, GPTQ_HEAD8_LAYOUT))
        for s in GGUF_SCHEMES:
            ladder.append((f"GGUF {s}", "gguf", 8 * BLOCK_LAYOUT[s][1] / BLOCK_LAYOUT[s][0], gguf_layout(s)))
        for i, (label, kind, bpw, layout) in enumerate(ladder):
            w, r = weight_bytes(config, layout, held)
            add(label, kind, bpw, w, r)
            if progress:
                progress(i + 1, len(ladder))
    fitting = [r for r in rows if r.fits]
    choice = max(fitting, key=_preference) if fitting else None
    return Recommendation(
        str(model), str(dev), memory_limit, "--memory" if memory is not None else "free", context, batch,
        bandwidth, runtime, activations, rows, choice,
    )  # fmt: skip


_KV_RANK = {"auto": 2, "fp8": 1, "int8": 0}


def _preference(r: Row) -> tuple:
    """Measured quality first (lower KL), then more bits in the weights, then a finer cache."""
    kl = r.quality.get("kl")
    return (kl is not None, -(kl or 0.0), r.bpw, _KV_RANK[r.kv])


def _device_runtime_and_free(dev: torch.device, plat) -> tuple[int, int]:
    """On a GPU: (the device memory held outside torch's allocator: the CUDA context, the kernels'
    modules and workspaces, other processes; what the variants may use: the memory free with
    this process's torch cache released, plus that runtime, since each row counts it)."""
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    free = plat.free_memory()
    runtime = plat.total_memory() - free - torch.cuda.memory_reserved(dev)
    return runtime, free + runtime


def _held_now(dev: torch.device) -> int:
    """Memory the process holds for tensors now: on the CPU its resident memory, anonymous and
    file-backed (a safetensors tensor already in the model's dtype stays a view of the mapped
    file, e.g. a bf16 checkpoint's embeddings, and the file's pages it read stay resident while
    that mapping lives: the peak of a run counts them too); torch's allocation on a GPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.memory_allocated(dev)
    return resident_bytes("RssAnon") + resident_bytes("RssFile")


def _load_measured(path, dtype, dev):
    """(model, bytes its weights hold): loaded with packed weights, the memory it took measured."""
    from tessera.models import load_model

    before = _held_now(dev)
    model = load_model(open_checkpoint(resolve_model(path)), dtype, dev, packed_weights=True)
    return model, max(0, _held_now(dev) - before)


def _linears(model):
    for layer in getattr(model, "layers", []):
        for obj in vars(layer).values():
            for sub in [obj, *getattr(obj, "__dict__", {}).values()]:
                if hasattr(sub, "weight") and hasattr(sub, "in_features"):
                    yield sub


def _bpw(model) -> float:
    """Held bits per weight of the decoder's linear layers."""
    bits = elems = 0
    for lin in _linears(model):
        bits += 8 * _nbytes(lin.weight)
        elems += lin.weight.shape[0] * lin.weight.shape[1]
    return bits / elems if elems else 0.0


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode token reads: all linears and the LM head (the embedding
    matrix where tied), one embedding row."""
    lin = sum(_nbytes(lin.weight) for lin in _linears(model))
    head = _nbytes(model.lm_head.weight) if getattr(model.lm_head, "weight", None) is not None else 0
    if not head:
        head = _nbytes(model.embed_tokens.weight)
    return lin + head + _nbytes(model.embed_tokens.weight) // model.config.vocab_size


# -- output ---------------------------------------------------------------------------------------


def table(rec: Recommendation) -> str:
    head = (
        f"{'variant':34} {'kv':5} {'bpw':>5} {'weights':>9} {'kv':>9} {'total':>9} {'fits':>4} "
        f"{'max ctx':>9} {'tok/s<=':>8} quality"
    )
    lines = [
        f"{rec.model} on {rec.device}: {_gib(rec.memory)} ({rec.memory_source}); context {rec.context:,}, "
        f"batch {rec.batch}; read bandwidth {rec.bandwidth / 1e9:.1f} GB/s; runtime {_gib(rec.runtime)}, "
        f"activations {_gib(rec.activations)} (measured)",
        head,
    ]
    for r in rec.rows:
        q = " ".join(f"{k}={v:.4g}" for k, v in r.quality.items()) or "-"
        lines.append(
            f"{r.label[:34]:34} {r.kv:5} {r.bpw:5.2f} {_gib(r.weights):>9} {_gib(r.kv_bytes):>9} "
            f"{_gib(r.total):>9} {'yes' if r.fits else 'no':>4} {r.max_context:>9,} {r.decode_tok_s:8.0f} {q}"
        )
    lines.append("recommendation: " + rec.sentence())
    return "\n".join(lines)


def load_evals(path: str | None) -> dict:
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--eval {path}: {e}") from None


# -- checking a prediction ------------------------------------------------------------------------


def measure_run(
    model: str, kv: str, context: int, batch: int, device: str = "cpu", max_num_batched_tokens: int = 2048
) -> dict:
    """Runs ``model`` on ``device`` as the engine serves it (packed weights, the device's
    preferred dtype, a KV cache of exactly ``batch`` sequences of ``context`` tokens) on
    ``batch`` requests that fill the context, and returns the peak memory of the run: the
    process's resident high-water mark on the CPU; on a GPU, the device memory held outside
    torch's allocator (as ``recommend`` counts its runtime) plus torch's peak reservation. Meant
    for a fresh process (``python -m tessera.engine.recommend``), so that the peak is this run's
    alone."""
    from tessera.kernels import preferred_dtype
    from tessera.sampling import SamplingParams

    from .llm import LLM

    dev = torch.device(device)
    dtype = preferred_dtype(dev)
    config = open_checkpoint(resolve_model(model)).config
    llm = LLM(
        model, device=dev.type, kv_cache_dtype=kv, max_model_len=context, max_num_seqs=batch,
        max_num_batched_tokens=max_num_batched_tokens, dtype=str(dtype).removeprefix("torch."),
        kv_cache_memory=kv_bytes(config, kv, dtype, batch * context)[0],
    )  # fmt: skip
    new = min(16, context - 1)
    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    prompts = [
        torch.randint(min(100, vocab - 1), vocab, (context - new,), generator=g).tolist()
        for _ in range(batch)
    ]
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    out = {"seconds": time.perf_counter() - t, "kv_cache_bytes": llm.kv_cache_bytes}
    out |= {"device": str(llm.device), "dtype": str(dtype).removeprefix("torch.")}
    if llm.device.type == "cpu":
        return {"peak": resident_bytes("VmHWM"), **out}
    gpu = llm.device
    torch.cuda.synchronize(gpu)
    plat = platform_for(gpu)
    outside = plat.total_memory() - plat.free_memory() - torch.cuda.memory_reserved(gpu)
    reserved = torch.cuda.max_memory_reserved(gpu)
    out |= {"outside_torch": outside, "torch_peak_reserved": reserved,
            "torch_peak_allocated": torch.cuda.max_memory_allocated(gpu)}  # fmt: skip
    return {"peak": outside + reserved, **out}


def verify(rec: Recommendation, row: Row) -> dict:
    """Runs ``row`` (a variant that exists as a file) in a fresh process on the device the
    recommendation was made for and compares its measured peak with the prediction."""
    import os
    import subprocess
    import sys

    if row.path is None:
        raise ValueError(f"{row.label} does not exist yet: convert it first, then name it with --variant")
    dev = torch.device(rec.device)
    env = dict(os.environ)
    if dev.type == "cuda" and dev.index:  # the engine takes a device kind: show it only that GPU
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[dev.index]
    cmd = [sys.executable, "-m", "tessera.engine.recommend", row.path, row.kv]
    cmd += [str(rec.context), str(rec.batch), dev.type]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the check run failed: {out.stderr.strip()[-2000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    measured["predicted"] = row.total
    measured["error"] = row.total / measured["peak"] - 1
    measured["variant"], measured["kv"] = row.label, row.kv
    return measured


if __name__ == "__main__":
    import sys

    m, kv, ctx, b, *device = sys.argv[1:6]
    print(json.dumps(measure_run(m, kv, int(ctx), int(b), *device)))


def exl2_bpw_for(model: str, device: str, memory: int, context: int, batch: int = 1) -> tuple[float, str]:
    """``convert --to exl2 --fit-memory``: the highest ladder bpw (and its cache dtype) whose
    predicted memory fits ``memory`` at ``context`` and ``batch``; a ValueError that says what
    the smallest needs where none does."""
    rec = recommend(model, device, memory, context, batch)
    fitting = [r for r in rec.rows if r.kind == "exl2" and r.fits]
    if not fitting:
        smallest = min((r for r in rec.rows if r.kind == "exl2"), key=lambda r: r.total)
        raise ValueError(
            f"no EXL2 variant of {model} fits in {_gib(memory)} at {context} tokens x batch {batch}: "
            f"{smallest.label} with a {smallest.kv} cache needs {_gib(smallest.total)}"
        )
    best = max(fitting, key=lambda r: (r.bpw, _KV_RANK[r.kv]))
    return best.bpw, best.kv
