"""``tessera convert``: quantize a model with calibration statistics, layer by layer, into another
checkpoint format (GPTQ here; a format is a ``LayerQuantizer``, so EXL2 plugs in the same way).

The source (HF folder, GGUF file, GPTQ/AWQ checkpoint) loads dequantized in float32. Calibration
rows (``formats.calibration``: documents never used for evaluation) enter as embeddings and go
through the decoder one layer at a time, and inside a layer one linear group at a time, in the
order GPTQ's "true sequential" mode uses: q/k/v (one input), o, gate/up (one input), down. Each
group's Hessian ``2 X^T X / n`` is gathered from its input as the already-quantized linears before
it produce it; the group is quantized; the next input is computed with the quantized weights. The
quantized layer's output is the next layer's input, so every layer corrects the error of those
before it.

Every finished layer is saved in a state folder beside the destination (``.DST.convert-state``)
with the hidden states it produced; a run with the same source, calibration and options resumes
after the last one. The output is assembled in a temporary folder beside the destination and
renamed onto it at the end: an error or interruption leaves no destination folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from tessera.formats import FormatError, open_checkpoint
from tessera.formats.calibration import split_text, token_rows
from tessera.formats.gptq import GPTQ_BITS
from tessera.formats.gptq_writer import checkpoint_format_for, gptq_parts, gptq_quantization_config
from tessera.formats.quantize import fp16_scales, gptq_quantize

STATE_VERSION = 1
CHUNK_TOKENS = 4096  # calibration tokens per matmul: bounds the working memory of one step
# HF files that describe the tokenizer and generation, copied from an HF source as they are
_HF_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear as the target format stores it."""

    tensors: dict[str, torch.Tensor]  # checkpoint name -> tensor, written as they are
    weight: torch.Tensor  # float32 [out, in]: the stored weight, which the following layers see
    error: float  # trace((W-Q) H (W-Q)^T) / trace(W H W^T) on the calibration inputs


class LayerQuantizer(Protocol):
    """A target format: quantizes one linear (its HF name, float32 weight and input Hessian) and
    says what config.json holds about it."""

    name: str

    def options(self) -> dict: ...

    def quantize(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedLinear: ...

    def quantization_config(self) -> dict: ...

    def check(self, config, src) -> None:
        """Refuses, before any work, a model this target cannot store."""
        ...


@dataclass(frozen=True)
class GPTQTarget:
    """GPTQ of one bit width (2, 3, 4 or 8), scales stored as float16. ``lm_head_bits``: the LM
    head quantized too (GPTQModel's ``lm_head=True``), at that width in groups of
    ``lm_head_group_size``, symmetric, without act-order (GPTQModel's defaults for the head: 8
    bits, groups of 32); None keeps it as the source has it, as HF GPTQ checkpoints usually do."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool
    damp: float = 0.01
    name: str = "gptq"
    lm_head_bits: int | None = None
    lm_head_group_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in GPTQ_BITS:
            raise ValueError(f"--bits {self.bits} is not a GPTQ width (supported: 2, 3, 4, 8)")
        if self.lm_head_bits is not None and self.lm_head_bits not in GPTQ_BITS:
            raise ValueError(
                f"--lm-head-bits {self.lm_head_bits} is not a GPTQ width (supported: 2, 3, 4, 8)"
            )
        for flag, g in (("--group-size", self.group_size), ("--lm-head-group-size", self.lm_head_group_size)):
            if g != -1 and (g <= 0 or g & (g - 1)):
                raise ValueError(f"{flag} {g} is not a power of two or -1 (one group per row)")
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp {self.damp} is not a fraction between 0 and 1")

    def options(self) -> dict:
        return asdict(self)

    def check(self, config, src) -> None:
        """3-bit GPTQ packs 32 values in 3 words: every linear's sizes must be multiples of 32."""
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        sizes = {config.hidden_size, config.intermediate_size, q, kv}
        if self.bits == 3 and any(n % 32 for n in sizes):
            raise ValueError(f"{src}: --bits 3 needs layer sizes in multiples of 32, not {sorted(sizes)}")
        head = (config.vocab_size, config.hidden_size)
        if self.lm_head_bits == 3 and any(n % 32 for n in head):
            raise ValueError(f"{src}: --lm-head-bits 3 needs the head's sizes in multiples of 32, not {head}")

    def quantize(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedLinear:
        return self._quantize(name, weight, hessian, self.bits, self.group_size, self.sym, self.act_order)

    def quantize_head(self, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedLinear:
        """The LM head at ``lm_head_bits`` (its zeros in the file's checkpoint_format)."""
        assert self.lm_head_bits is not None
        return self._quantize(
            "lm_head", weight, hessian, self.lm_head_bits, self.lm_head_group_size, True, False
        )

    def _quantize(self, name, weight, hessian, bits, group_size, sym, act_order) -> QuantizedLinear:
        res = gptq_quantize(
            weight, hessian, group_bits=bits, group_size=group_size, sym=sym,
            act_order=act_order, damp=self.damp, scale_fn=fp16_scales,
        )  # fmt: skip
        parts = gptq_parts(res.groups, checkpoint_format_for(self.sym))
        return QuantizedLinear(
            {f"{name}.{k}": v for k, v in parts.items()}, res.groups.dequantize(), res.output_error
        )

    def quantization_config(self) -> dict:
        from importlib.metadata import version

        head = None
        if self.lm_head_bits is not None:
            head = {
                "bits": self.lm_head_bits,
                "group_size": self.lm_head_group_size,
                "sym": True,
                "desc_act": False,
            }
        return gptq_quantization_config(
            self.bits, self.group_size, self.sym, self.act_order, self.damp,
            f"tessera:{version('tessera-engine')}", lm_head=head,
        )  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    path: Path
    rows: int
    row_length: int

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.row_length <= 1:
            raise ValueError(f"--rows ({self.rows}) and --row-length ({self.row_length}) must be positive")


@dataclass
class ConvertReport:
    layers: int
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)  # linear -> relative output error
    resumed_at: int = 0


# -- the source model ----------------------------------------------------------------------------


def _check_model(model, config, src) -> None:
    """Only Llama-family decoders (dense, SiLU MLP, no QK-norm, HF-expressible RoPE) convert."""
    arch = config.architecture
    if arch not in _HF_CLASSES or not hasattr(model, "layer_specs"):
        raise FormatError(
            f"{src}: converting architecture {arch!r} is not supported (supported: {', '.join(_HF_CLASSES)})"
        )
    if model.rotary.freq_factors is not None:
        raise FormatError(
            f"{src}: RoPE frequency factors (GGUF rope_freqs) have no HF config form to write; "
            "convert from the HF checkpoint instead"
        )


def _fingerprint(src: Path, target: LayerQuantizer, cal: Calibration) -> str:
    """What a resumable state must match: the source's and calibration file's names, sizes and
    modification times, and every option."""

    def stat(p: Path) -> list:
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        return [[str(f.relative_to(p) if p.is_dir() else f), f.stat().st_size, f.stat().st_mtime_ns]
                for f in files if f.is_file()]  # fmt: skip

    doc = {
        "version": STATE_VERSION,
        "source": [str(src.resolve()), stat(src)],
        "target": [target.name, target.options()],
        "calibration": [str(cal.path.resolve()), stat(cal.path), cal.rows, cal.row_length],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# -- one decoder layer, quantized in sequence ----------------------------------------------------


def _chunks(n_rows: int, row_length: int) -> list[slice]:
    """Row ranges of about CHUNK_TOKENS tokens (whole rows: attention needs the row)."""
    per = max(1, CHUNK_TOKENS // row_length)
    return [slice(r, min(r + per, n_rows)) for r in range(0, n_rows, per)]


def _hessian(inputs: Callable[[slice], torch.Tensor], chunks: list[slice]) -> torch.Tensor:
    """``2 X^T X / n`` over the inputs that ``inputs(rows)`` gives (``[tokens, in]``) chunk by chunk."""
    h, n = None, 0
    for rows in chunks:
        x = inputs(rows)
        x = x.reshape(-1, x.shape[-1]).double()
        h = x.T @ x if h is None else h.addmm_(x.T, x)
        n += x.shape[0]
    return (h * (2.0 / n)).float()


def _attention(qkv: torch.Tensor, spec, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of rows ``qkv [r, T, (Hq + 2 Hk) * D]`` -> ``[r, T, Hq * D]``
    (rotary as the model applies it; a sliding window where the layer has one)."""
    from tessera.kernels import ops

    r, t, _ = qkv.shape
    d, hq, hk = spec.head_dim, spec.num_heads, spec.num_kv_heads
    q, k, v = qkv.reshape(r * t, -1).split([hq * d, hk * d, hk * d], dim=-1)
    q, k = ops.rotary_embedding(q, k, cos.repeat(r, 1), sin.repeat(r, 1), d)
    q = q.reshape(r, t, hq, d).transpose(1, 2)
    k = k.reshape(r, t, hk, d).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    v = v.reshape(r, t, hk, d).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
    pos = torch.arange(t)
    mask = pos[None, :] <= pos[:, None]
    if spec.sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - spec.sliding_window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale)
    return out.transpose(1, 2).reshape(r, t, hq * d)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.T
    return y if b is None else y + b


def _split(t: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if t is None else list(t.split(sizes))


@torch.inference_mode()
def quantize_layer(
    prefix: str, spec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, target: LayerQuantizer
) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
    """Quantize one Llama decoder layer (a ``DecoderLayerSpec`` with dense float32 weights) on its
    input hidden states ``x [rows, T, hidden]``: q/k/v, then o, then gate/up, then down, each
    group's input computed with the quantized groups before it. Returns the tensors to write,
    each linear's relative output error, and the layer's output (the next layer's input)."""
    from tessera.kernels import ops

    chunks = _chunks(x.shape[0], x.shape[1])
    d = spec.head_dim
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}

    def quantize(names: list[str], weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        """The linears stacked in ``weight`` (q|k|v, gate|up: one input, one Hessian), each
        quantized on its own, stacked again as the quantized weight."""
        if len(names) == 3:
            sizes = [spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d]
        else:
            sizes = [weight.shape[0] // len(names)] * len(names)
        out = []
        for name, w in zip(names, weight.split(sizes), strict=True):
            ql = target.quantize(f"{prefix}.{name}", w.float().contiguous(), hessian)
            tensors.update(ql.tensors)
            errors[f"{prefix}.{name}"] = ql.error
            out.append(ql.weight)
        return torch.cat(out)

    def norm1(rows):
        return ops.rms_norm(x[rows].reshape(-1, x.shape[-1]), spec.input_norm, spec.eps)

    qkv_w = quantize(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], spec.qkv.weight, _hessian(norm1, chunks)
    )
    attn = torch.cat(
        [_attention(_linear(norm1(r), qkv_w, spec.qkv.bias).reshape(r.stop - r.start, x.shape[1], -1),
                    spec, cos, sin) for r in chunks]
    )  # fmt: skip
    o_w = quantize(["self_attn.o_proj"], spec.o.weight, _hessian(lambda r: attn[r], chunks))
    mid = x + _linear(attn, o_w, spec.o.bias)

    def norm2(rows):
        return ops.rms_norm(mid[rows].reshape(-1, mid.shape[-1]), spec.post_attention_norm, spec.eps)

    gu_w = quantize(["mlp.gate_proj", "mlp.up_proj"], spec.gate_up.weight, _hessian(norm2, chunks))

    def act(rows):
        return ops.silu_and_mul(_linear(norm2(rows), gu_w, spec.gate_up.bias))

    down_w = quantize(["mlp.down_proj"], spec.down.weight, _hessian(act, chunks))
    out = torch.cat(
        [mid[r] + _linear(act(r), down_w, spec.down.bias).reshape(r.stop - r.start, x.shape[1], -1)
         for r in chunks]
    )  # fmt: skip
    return tensors, errors, out


# -- what is written besides the quantized linears -----------------------------------------------


def _plain_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, norms, biases and the LM head under their HF names, in ``dtype``."""
    out = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, spec in enumerate(model.layer_specs):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = spec.input_norm
        out[f"{p}.post_attention_layernorm.weight"] = spec.post_attention_norm
        d = spec.head_dim
        qkv = [spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d]
        half = spec.gate_up.weight.shape[0] // 2
        biases = [
            (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), spec.qkv.bias, qkv),
            (("self_attn.o_proj",), spec.o.bias, [spec.o.weight.shape[0]]),
            (("mlp.gate_proj", "mlp.up_proj"), spec.gate_up.bias, [half, half]),
            (("mlp.down_proj",), spec.down.bias, [spec.down.weight.shape[0]]),
        ]
        for names, bias, sizes in biases:
            for name, b in zip(names, _split(bias, sizes), strict=True):
                if b is not None:
                    out[f"{p}.{name}.bias"] = b
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _storage_dtype(ck) -> torch.dtype:
    """An HF source's own float dtype (its unquantized tensors round-trip exactly); float16 for
    a GGUF source, whose tensors have no HF dtype."""
    if ck.path.is_dir():
        name = ck.config.torch_dtype
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(name, torch.float16)
    return torch.float16


def _hf_config(ck, dtype: torch.dtype, quantization_config: dict) -> dict:
    """config.json: an HF source's own (its quantization_config replaced); for a GGUF source one
    written from the model's config, with the fields transformers and tessera read."""
    name = str(dtype).removeprefix("torch.")
    if ck.path.is_dir():
        cfg = json.loads((ck.path / "config.json").read_text(encoding="utf-8"))
        cfg.pop("quantization_config", None)
        return {**cfg, "quantization_config": quantization_config}
    c = ck.config
    eos = list(c.eos_token_ids)
    return {
        "architectures": [_HF_CLASSES[c.architecture]],
        "model_type": c.architecture,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias,
        "mlp_bias": c.mlp_bias,
        "sliding_window": c.sliding_window,
        "use_sliding_window": c.sliding_window is not None,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "torch_dtype": name,
        "quantization_config": quantization_config,
    }


def _write_side_files(ck, folder: Path) -> None:
    """Tokenizer and generation files: an HF source's copied; a GGUF source's tokenizer saved as
    tokenizer.json with its special tokens and chat template in tokenizer_config.json."""
    if ck.path.is_dir():
        for name in _HF_SIDE_FILES:
            if (ck.path / name).is_file():
                shutil.copyfile(ck.path / name, folder / name)
        return
    tok = ck.tokenizer()
    tok.hf.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.token_text(tok.bos_token_id),
        "eos_token": tok.token_text(tok.eos_token_id),
        "chat_template": tok.chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.eos_token_ids)}
    (folder / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v}))


# -- state: finished layers, so that an interrupted run continues --------------------------------


class ConvertState:
    """``.DST.convert-state/`` beside the destination: ``state.json`` (fingerprint, layers done),
    ``layer-<i>.safetensors`` (the tensors of finished layer i), ``hidden-<n>.safetensors`` (the
    hidden states after n layers). Files are replaced atomically, state.json last."""

    def __init__(self, dst: Path, fingerprint: str) -> None:
        self.folder = dst.parent / f".{dst.name}.convert-state"
        self.fingerprint = fingerprint

    def done(self) -> int | None:
        """Layers finished by an earlier run with the same fingerprint; None if there is none."""
        path = self.folder / "state.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if doc.get("fingerprint") != self.fingerprint:
            return None
        n = doc.get("layers_done")
        return n if isinstance(n, int) and (self.folder / f"hidden-{n}.safetensors").is_file() else None

    def start(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._write_json(0)

    def hidden(self, n: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self.folder / f"hidden-{n}.safetensors")["hidden"]

    def save_hidden(self, n: int, hidden: torch.Tensor) -> None:
        self._save(f"hidden-{n}.safetensors", {"hidden": hidden.contiguous()})

    def finish_layer(self, i: int, tensors: dict[str, torch.Tensor], hidden: torch.Tensor) -> None:
        self._save(f"layer-{i}.safetensors", tensors)
        self.save_hidden(i + 1, hidden)
        self._write_json(i + 1)
        (self.folder / f"hidden-{i}.safetensors").unlink(missing_ok=True)

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.folder / f"layer-{i}.safetensors")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.folder / f"{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / name)

    def _write_json(self, done: int) -> None:
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "layers_done": done}))
        os.replace(tmp, self.folder / "state.json")


# -- the conversion ------------------------------------------------------------------------------


def check_destination(dst: Path, force: bool) -> None:
    """Refuse an existing destination (unless ``force``) or one whose parent folder is missing."""
    if dst.exists() and not force:
        raise ValueError(f"{dst}: already exists (--force replaces it)")
    if not dst.parent.is_dir():
        raise ValueError(f"{dst.parent}: no such folder to write {dst.name} in")


def calibration_rows(ck, cal: Calibration) -> torch.Tensor:
    """``[rows, row_length]`` token ids from the calibration documents of ``cal.path``."""
    tok = ck.tokenizer()
    docs = split_text(cal.path).calibration
    rows = token_rows(
        docs, lambda s: tok.encode(s, add_special_tokens=False), cal.rows, cal.row_length, cal.path
    )
    return torch.tensor(rows)


@contextlib.contextmanager
def _staging(dst: Path) -> Iterator[Path]:
    """A temporary folder beside ``dst``, renamed onto it when the block ends cleanly and
    removed when it raises (an existing ``dst`` is replaced only then)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the result is an ordinary folder
        yield tmp
        for f in tmp.iterdir():  # safetensors writes its files 0600: ordinary files too
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if dst.exists():
            old = dst.parent / f".{dst.name}.{os.getpid()}.old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(
    src: Path,
    dst: Path,
    target: LayerQuantizer,
    cal: Calibration,
    *,
    force: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    write: Callable[..., None] | None = None,
) -> ConvertReport:
    """Quantize the model at ``src`` into ``target``'s format at ``dst`` (see the module doc).
    Bad input (destination, calibration text, model) is refused before anything is written;
    ``resume`` insists on a matching state (a matching state is resumed anyway). ``write(ck,
    model, dst, target, state)`` makes the output from the finished layers (default: the HF
    GPTQ folder)."""
    from tqdm import tqdm

    from tessera.models import load_model

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    check_destination(dst, force)
    ck = open_checkpoint(src)
    target.check(ck.config, src)
    ids = calibration_rows(ck, cal)
    model = load_model(ck, torch.float32, packed_weights=False)
    _check_model(model, ck.config, src)
    state = ConvertState(dst, _fingerprint(src, target, cal))
    done = state.done()
    if done is None and resume:
        raise ValueError(
            f"{state.folder}: no state of a conversion with this source, calibration and options"
        )
    if done is None:
        state.start()
        done = 0
        state.save_hidden(0, model.embed_input_ids(ids.reshape(-1)).reshape(*ids.shape, -1).float())
    else:
        log(f"tessera: resuming after {done} finished layers ({state.folder})")
    report = ConvertReport(layers=len(model.layer_specs), seconds=0.0, resumed_at=done)

    t = ids.shape[1]
    positions = torch.arange(t)
    cos, sin = model.rotary.cos_sin(positions, torch.full((t,), t))
    hidden = state.hidden(done)
    bar = tqdm(total=report.layers, initial=done, desc=f"{target.name} layers", unit="layer", disable=None)
    for i in range(done, report.layers):
        tensors, errors, hidden = quantize_layer(
            f"model.layers.{i}", model.layer_specs[i], hidden, cos, sin, target
        )
        state.finish_layer(i, tensors, hidden)
        report.errors.update(errors)
        bar.update(1)
        bar.set_postfix(err=f"{max(errors.values()):.4f}")
    bar.close()
    report.errors.update((write or _write)(ck, model, dst, target, state) or {})
    state.remove()
    report.seconds = time.perf_counter() - t0
    return report


def head_hessian(model, state: ConvertState) -> torch.Tensor:
    """The LM head's input Hessian: the final norm's output of the last layer's (quantized)
    hidden states."""
    from tessera.kernels import ops

    hidden = state.hidden(len(model.layer_specs))
    eps = model.config.rms_norm_eps

    def normed(rows):
        return ops.rms_norm(hidden[rows].reshape(-1, hidden.shape[-1]), model.norm.weight, eps)

    return _hessian(normed, _chunks(hidden.shape[0], hidden.shape[1]))


def _write(ck, model, dst: Path, target: GPTQTarget, state: ConvertState) -> dict[str, float]:
    """The destination folder: model.safetensors, config.json (and quantize_config.json, which
    GPTQModel also writes), tokenizer and generation files. A quantized LM head of a model whose
    head is tied to its embeddings is written as its own weight (config.json unties them; the
    embeddings stay in the source's float dtype: GPTQModel refuses a tied head instead). Returns
    the head's relative output error where it was quantized."""
    from safetensors.torch import save_file

    dtype = _storage_dtype(ck)
    tensors = _plain_tensors(model, dtype)
    for i in range(len(model.layer_specs)):
        tensors.update(state.layer_tensors(i))
    errors = {}
    head = target.lm_head_bits is not None
    if head:
        tensors.pop("lm_head.weight", None)
        q = target.quantize_head(model.lm_head.weight.float().contiguous(), head_hessian(model, state))
        tensors.update(q.tensors)
        errors["lm_head"] = q.error
    qcfg = target.quantization_config()
    hf_config = _hf_config(ck, dtype, qcfg)
    if head:
        hf_config["tie_word_embeddings"] = False
    with _staging(dst) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
        _write_side_files(ck, tmp)
    return errors
