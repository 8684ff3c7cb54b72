"""Reading a GGUF file: metadata -> ModelConfig, tensors -> our parameter names, the tokenizer."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .config_values import (
    MAX_SIZE,
    check_embedding,
    check_layer_count,
    head_dim_for,
    read_float,
    read_int,
    read_optional_int,
    short_name,
    shown,
)
from .errors import FormatError
from .gguf_quants import BLOCK_LAYOUT
from .quantized import QuantizedTensor
from .tokenizer import Tokenizer

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# GGUF general.architecture -> our architecture (Mistral GGUFs say "llama"; so does Mixtral, told
# apart by its expert count)
_GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "gemma3": "gemma3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
}
# the metadata (under "<arch>.") that head_dim_for checks: hidden size, heads, kv heads, head dim
_HEAD_KEYS = ("embedding_length", "attention.head_count", "attention.head_count_kv", "attention.key_length")
_LAYER_RE = re.compile(r"blk\.(0|[1-9]\d{0,8})\.(.+)")
# llama.cpp's Gemma 3: five sliding-window layers, then one global, with the local rope base fixed
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_THETA = 10000.0


class GGUFCheckpoint:
    """One ``.gguf`` file. Opening reads the header, checks every tensor's type and extent and
    every config value against the tensors present; weights load lazily."""

    def __init__(self, path: str | Path) -> None:
        from .gguf_file import GGUFFile

        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such file")
        try:
            self._reader = GGUFFile(self.path)
        except ValueError as e:  # the reader's own account of the damage
            raise FormatError(f"{self.path}: not a readable GGUF file: {e}") from e
        except Exception as e:  # struct, numpy or OS errors on damage
            raise FormatError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.metadata = self._read_metadata()
        self._check_tensors()
        self.config = self._read_config()

    def _read_metadata(self) -> dict:
        return dict(self._reader.fields)

    def _check_tensors(self) -> None:
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            qtype, name = t.tensor_type.name, short_name(t.name)
            if qtype not in BLOCK_LAYOUT:
                raise FormatError(
                    f"{self.path}: tensor {name} has type {qtype}, which this build cannot read "
                    f"(supported: {', '.join(BLOCK_LAYOUT)})"
                )
            if t.data_offset + t.n_bytes > size:
                raise FormatError(
                    f"{self.path}: tensor {name} ends at byte {t.data_offset + t.n_bytes} "
                    f"but the file has {size} bytes (truncated?)"
                )

    def _read_config(self) -> ModelConfig:
        meta, src = self.metadata, self.path
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in _GGUF_ARCHITECTURES:
            raise FormatError(
                f"{src}: architecture {shown(arch)} is not supported "
                f"(supported: {', '.join(_GGUF_ARCHITECTURES)})"
            )

        def get(key: str, default=None, required: bool = False):
            full = f"{arch}.{key}"
            if full not in meta:
                if required:
                    raise FormatError(f"{src}: metadata key {full} is missing")
                return default
            return meta[full]

        def get_int(key: str, default: int | None = None, maximum: int = MAX_SIZE) -> int:
            value = get(key, default, required=default is None)
            return read_int(value, f"{arch}.{key}", src, maximum=maximum)

        hidden = get_int("embedding_length")
        heads = get_int("attention.head_count")
        kv_heads = get_int("attention.head_count_kv", heads)
        key_length = get("attention.key_length")
        if key_length is not None:
            key_length = get_int("attention.key_length")
        keys = tuple(f"{arch}.{k}" for k in _HEAD_KEYS)
        head_dim = head_dim_for(hidden, heads, kv_heads, key_length, keys, src)
        for key in ("attention.value_length", "rope.dimension_count"):
            if get(key) is not None and get_int(key) != head_dim:
                raise FormatError(
                    f"{src}: {arch}.{key} is {get(key)} but the head size is {head_dim} (not supported)"
                )
        n_layers = get_int("block_count", maximum=2**64)  # bounded next by the blocks present
        tensors = self._reader.tensors
        layers = {int(m.group(1)) for m in (_LAYER_RE.fullmatch(t.name) for t in tensors) if m}
        check_layer_count(n_layers, f"{arch}.block_count", src, layers, "the file", "block")

        tokens = meta.get("tokenizer.ggml.tokens")
        n_tokens = len(tokens) if isinstance(tokens, list) else 0
        vocab = get("vocab_size")
        if vocab is None:
            if not n_tokens:
                raise FormatError(
                    f"{src}: neither {arch}.vocab_size nor tokenizer.ggml.tokens says the vocab size"
                )
            vocab = n_tokens
        vocab = read_int(vocab, f"{arch}.vocab_size", src)
        if n_tokens > vocab:
            raise FormatError(
                f"{src}: tokenizer.ggml.tokens has {n_tokens} tokens but {arch}.vocab_size is {vocab}"
            )
        embedding = next((t for t in tensors if t.name == "token_embd.weight"), None)
        if embedding is None:
            raise FormatError(f"{src}: tensor token_embd.weight is missing")
        check_embedding(
            vocab,
            hidden,
            (f"{arch}.vocab_size", f"{arch}.embedding_length"),
            src,
            "token_embd.weight",
            tuple(reversed(embedding.shape)),
        )

        names = {t.name for t in tensors}
        scaling = None
        scaling_type = get("rope.scaling.type")
        if scaling_type == "linear":
            factor = read_float(get("rope.scaling.factor", 1.0), f"{arch}.rope.scaling.factor", src)
            scaling = {"rope_type": "linear", "factor": factor}
        elif scaling_type not in (None, "none"):
            raise FormatError(
                f"{src}: rope scaling {shown(scaling_type)} is not supported (supported: linear)"
            )
        eos = [
            read_int(meta[k], k, src, minimum=0)
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if k in meta
        ]
        sliding = get("attention.sliding_window")
        sliding = None if sliding is None else get_int("attention.sliding_window")
        ours = _GGUF_ARCHITECTURES[arch]
        extra: dict = {}
        if ours == "gemma3":
            if sliding is None:
                raise FormatError(f"{src}: metadata key {arch}.attention.sliding_window is missing")
            extra = {
                "layer_types": tuple(
                    "full_attention" if (i + 1) % _GEMMA3_PATTERN == 0 else "sliding_attention"
                    for i in range(n_layers)
                ),
                "hidden_act": "gelu_pytorch_tanh",
                "qk_norm": True,
                "rope_local_theta": _GEMMA3_LOCAL_THETA,
            }
            cap = get("final_logit_softcapping")
            if cap is not None:
                extra["final_logit_softcapping"] = read_float(cap, f"{arch}.final_logit_softcapping", src)
        n_experts = get("expert_count")
        if n_experts is not None and get_int("expert_count", maximum=4096) > 0:
            if ours == "llama":
                ours = "mixtral"
            if ours not in ("mixtral", "qwen2_moe", "qwen3_moe"):
                raise FormatError(f"{src}: {arch}.expert_count is set, but {arch} has no experts")
            experts = get_int("expert_count", maximum=4096)
            ff = "feed_forward_length" if ours == "mixtral" else "expert_feed_forward_length"
            shared = get("expert_shared_feed_forward_length")
            # llama.cpp renormalises the chosen experts' weights for Mixtral and Qwen3-MoE only,
            # unless the file says otherwise
            norm = get("expert_weights_norm", ours != "qwen2_moe")
            if not isinstance(norm, bool):
                raise FormatError(f"{src}: {arch}.expert_weights_norm is {shown(norm)}, not true or false")
            extra |= {
                "num_experts": experts,
                "num_experts_per_tok": get_int("expert_used_count", maximum=experts),
                "moe_intermediate_size": get_int(ff),
                "shared_expert_intermediate_size": 0
                if shared is None
                else get_int("expert_shared_feed_forward_length"),
                "norm_topk_prob": norm,
                "qk_norm": ours == "qwen3_moe",
                # no metadata lists them: a layer with a dense MLP and no router (HF's
                # mlp_only_layers) is dense; its MLP is feed_forward_length wide
                "dense_layers": tuple(
                    i
                    for i in range(n_layers)
                    if f"blk.{i}.ffn_down.weight" in names and f"blk.{i}.ffn_gate_inp.weight" not in names
                ),
            }
        elif ours in ("qwen2_moe", "qwen3_moe"):
            raise FormatError(f"{src}: metadata key {arch}.expert_count is missing")
        ff_key = "feed_forward_length"
        needs_ff = "num_experts" not in extra or extra["dense_layers"]
        intermediate = get_int(ff_key) if get(ff_key) is not None or needs_ff else 0
        return ModelConfig(
            architecture=ours,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=read_float(
                get("attention.layer_norm_rms_epsilon", 1e-5), f"{arch}.attention.layer_norm_rms_epsilon", src
            ),
            rope_theta=read_float(get("rope.freq_base", 10000.0), f"{arch}.rope.freq_base", src),
            rope_scaling=scaling,
            max_position_embeddings=get_int("context_length", 2048),
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            sliding_window=sliding,
            bos_token_id=read_optional_int(
                meta.get("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id", src
            ),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            **extra,
        )

    @property
    def generation_config(self) -> dict:
        return {}

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf_metadata(self.metadata, str(self.path))

    def tensor_names(self) -> list[str]:
        return [t.name for t in self._reader.tensors]

    def weights(self) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        """(GGUF name, tensor) for every tensor: float types as float tensors, others packed
        (an expert tensor ``[E, N, K]`` as E packed matrices). The model maps the names."""
        for t in self._reader.tensors:
            qtype = t.tensor_type.name
            shape = tuple(reversed(t.shape))
            raw = torch.from_numpy(np.array(t.data))  # bytes, copied out of the memory map
            if qtype in _FLOAT_TYPES:
                value: torch.Tensor | QuantizedTensor = raw.view(_FLOAT_TYPES[qtype]).reshape(shape)
            else:
                value = QuantizedTensor(qtype, raw.reshape(math.prod(shape[:-1]), -1), shape)
            yield t.name, value
