"""Reading an HF model folder: config.json, (sharded) safetensors, tokenizer, generation config.

Plain, GPTQ/AWQ (``gptq.py``) and EXL2 (``exl2.py``) checkpoints: a quantized linear's parts
are checked at open and yielded by ``weights()`` as one ``<prefix>.weight`` tensor object."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .config_values import (
    MAX_SIZE,
    check_embedding,
    check_layer_count,
    head_dim_for,
    read_bool,
    read_float,
    read_int,
    read_optional_int,
    read_token_ids,
    short_name,
    shown,
)
from .errors import FormatError
from .exl2 import PARTS as EXL2_PARTS
from .exl2 import (
    EXL2Config,
    EXL2Tensor,
    check_exl2_headers,
    check_perm,
    check_scale_max,
    exl2_config_from_hf,
    exl2_tensor,
    read_group_layout,
)
from .gptq import (
    PARTS,
    GPTQConfig,
    GPTQTensor,
    check_g_idx,
    check_gptq_shapes,
    check_sym_zeros,
    gptq_tensor,
    is_lm_head,
    quantization_config_from_hf,
)
from .json_file import read_json_object
from .llava_config import llava_multimodal_config, llava_text_config
from .qwen2_vl_config import mrope_scaling, qwen2_vl_multimodal_config, qwen2_vl_text_config
from .tokenizer import Tokenizer

# the language model's tensors: on their own, or in a LLaVA checkpoint as transformers 5
# (``model.language_model.``) or 4 (``language_model.model.``) names them
_LM_PREFIX = r"(?:model\.|model\.language_model\.|language_model\.model\.)"
_LAYER_TENSOR = re.compile(_LM_PREFIX + r"layers\.(0|[1-9]\d{0,8})\..+")
_EMBEDDING = re.compile(_LM_PREFIX + r"embed_tokens\.weight")


def _rope_scaling(scaling, head_dim: int, source) -> dict | None:
    """HF's rope_scaling with its numbers checked (they divide frequencies and wavelengths)."""
    if not isinstance(scaling, dict):
        raise FormatError(f"{source}: rope_scaling is {shown(scaling)}, not an object")
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = kind
    if "mrope_section" in scaling:  # Qwen2-VL: 4.x says type "mrope", transformers 5 "default"
        if kind not in ("default", "mrope"):
            raise FormatError(f"{source}: rope scaling {shown(kind)} with mrope_section is not supported")
        return mrope_scaling(scaling["mrope_section"], head_dim, source)
    if kind == "default":
        return None
    if kind not in ("llama3", "linear", "dynamic"):
        raise FormatError(
            f"{source}: rope scaling {shown(kind)} is not supported (supported: llama3, linear, dynamic)"
        )
    scaling["factor"] = read_float(scaling.get("factor"), "rope_scaling.factor", source)
    if kind == "llama3":
        scaling["original_max_position_embeddings"] = read_int(
            scaling.get("original_max_position_embeddings"),
            "rope_scaling.original_max_position_embeddings",
            source,
        )
        low = read_float(scaling.get("low_freq_factor", 1.0), "rope_scaling.low_freq_factor", source)
        high = read_float(scaling.get("high_freq_factor", 4.0), "rope_scaling.high_freq_factor", source)
        if low == high:
            raise FormatError(f"{source}: rope_scaling.low_freq_factor and high_freq_factor are both {low}")
        scaling["low_freq_factor"], scaling["high_freq_factor"] = low, high
    return scaling


def config_from_hf_dict(cfg: dict, source: str) -> ModelConfig:
    """Our ModelConfig from the fields of an HF config.json (transformers 4.x or 5.x layout).

    Every value is checked before anything is built from it; a bad one is a FormatError that names
    the field and the value.
    """
    if not isinstance(cfg, dict):
        raise FormatError(f"{source}: holds {shown(cfg)}, expected a JSON object")
    arch = cfg.get("model_type")
    if arch == "gemma3" and isinstance(cfg.get("text_config"), dict):
        cfg, arch = {**cfg["text_config"], "model_type": "gemma3_text"}, "gemma3_text"
    arch = _MODEL_TYPES.get(arch, arch) if isinstance(arch, str) else arch
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise FormatError(
            f"{source}: architecture {shown(cfg.get('model_type'))} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    if arch == "llava":
        return _llava_config(cfg, source)
    if arch == "qwen2_vl":
        return _qwen2_vl_config(cfg, source)

    def required(key: str, maximum: int = MAX_SIZE) -> int:
        if key not in cfg:
            raise FormatError(f"{source}: {key} is missing")
        return read_int(cfg[key], key, source, maximum=maximum)

    def optional(key: str, default: int | None) -> int | None:
        value = cfg.get(key)
        return default if value is None else read_int(value, key, source)

    def optional_float(key: str) -> float | None:
        value = cfg.get(key)
        return None if value is None else read_float(value, key, source)

    hidden = required("hidden_size")
    heads = required("num_attention_heads")
    kv_heads = optional("num_key_value_heads", heads)
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    head_dim = head_dim_for(hidden, heads, kv_heads, optional("head_dim", None), keys, source)
    n_layers = required("num_hidden_layers", maximum=2**64)  # bounded by the layers present when opened

    rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
    if not isinstance(rope, dict):
        raise FormatError(f"{source}: rope_parameters is {shown(rope)}, not an object")
    local_theta = None
    if isinstance(rope.get("full_attention"), dict):  # per layer type (Gemma 3 in transformers 5)
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in local:
            local_theta = read_float(
                local["rope_theta"], "rope_parameters.sliding_attention.rope_theta", source
            )
        rope = rope["full_attention"]
    if arch == "gemma3" and local_theta is None:
        local_theta = read_float(cfg.get("rope_local_base_freq", 10000.0), "rope_local_base_freq", source)
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_theta = read_float(theta, "rope_theta", source)
    scaling = cfg.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    scaling = _rope_scaling(scaling, head_dim, source) if scaling else None

    use_sliding = read_bool(cfg.get("use_sliding_window"), "use_sliding_window", source)
    sliding = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen2_moe", "qwen3_moe") and not use_sliding:
        sliding = None
    sliding = read_optional_int(sliding or None, "sliding_window", source, minimum=1)
    layer_types = cfg.get("layer_types")
    if layer_types is None and arch == "gemma3":
        _check_layer_list(n_layers, source)
        pattern = read_int(cfg.get("sliding_window_pattern", 6), "sliding_window_pattern", source)
        layer_types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
        ]
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(
            t in ("full_attention", "sliding_attention") for t in layer_types
        ):
            raise FormatError(
                f"{source}: layer_types is {shown(layer_types)}, "
                "not a list of 'full_attention' / 'sliding_attention'"
            )
        if len(layer_types) != n_layers:
            raise FormatError(
                f"{source}: layer_types has {len(layer_types)} entries but num_hidden_layers is {n_layers}"
            )
        if "sliding_attention" in layer_types and sliding is None:
            raise FormatError(f"{source}: layer_types has sliding layers but sliding_window is not set")
        layer_types = tuple(layer_types)
    attn_bias = read_bool(cfg.get("attention_bias"), "attention_bias", source)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if not isinstance(dtype, str):
        raise FormatError(f"{source}: torch_dtype is {shown(dtype)}, not a string")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise FormatError(
            f"{source}: activation {shown(act)} is not supported (supported: silu, gelu_pytorch_tanh)"
        )
    moe = _moe_fields(cfg, arch, n_layers, source)
    quant = cfg.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "exl2":
        quant = exl2_config_from_hf(quant, source)
    elif quant is not None:
        quant = quantization_config_from_hf(quant, source)
    return ModelConfig(
        architecture=arch,
        vocab_size=required("vocab_size"),
        hidden_size=hidden,
        intermediate_size=required("intermediate_size"),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=read_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=optional("max_position_embeddings", 2048),
        tie_word_embeddings=read_bool(
            cfg.get("tie_word_embeddings"), "tie_word_embeddings", source, default=arch == "gemma3"
        ),
        qkv_bias=True if arch in ("qwen2", "qwen2_moe") else attn_bias,
        o_bias=attn_bias if arch in ("llama", "gemma3") else False,
        mlp_bias=read_bool(cfg.get("mlp_bias"), "mlp_bias", source),
        sliding_window=sliding,
        bos_token_id=read_optional_int(cfg.get("bos_token_id"), "bos_token_id", source),
        eos_token_ids=read_token_ids(cfg.get("eos_token_id"), "eos_token_id", source),
        torch_dtype=dtype,
        layer_types=layer_types,
        hidden_act=act,
        qk_norm=arch in ("gemma3", "qwen3_moe"),
        query_pre_attn_scalar=optional_float("query_pre_attn_scalar"),
        rope_local_theta=local_theta,
        final_logit_softcapping=optional_float("final_logit_softcapping"),
        quantization=quant,
        **moe,
    )


def _llava_config(cfg: dict, source: str) -> ModelConfig:
    """A LLaVA model: its language model's config, with the vision tower and projector beside."""
    text = config_from_hf_dict(llava_text_config(cfg, source), f"{source} (text_config)")
    mm = llava_multimodal_config(cfg, text.architecture, source)
    if mm.image_token_id >= text.vocab_size:
        raise FormatError(
            f"{source}: the image token id {mm.image_token_id} is outside the vocabulary "
            f"(text_config.vocab_size {text.vocab_size})"
        )
    return replace(text, architecture="llava", multimodal=mm)


def _qwen2_vl_config(cfg: dict, source: str) -> ModelConfig:
    """A Qwen2-VL model: its Qwen2 language model with M-RoPE, the vision transformer beside."""
    text = config_from_hf_dict(qwen2_vl_text_config(cfg, source), f"{source} (text_config)")
    if text.rope_scaling is None:  # transformers' default sections (head_dim 128)
        text = replace(text, rope_scaling=mrope_scaling([16, 24, 24], text.head_dim, source))
    elif text.rope_scaling["rope_type"] != "mrope":
        raise FormatError(
            f"{source}: rope scaling {shown(text.rope_scaling['rope_type'])} is not supported in a Qwen2-VL "
            "model (supported: mrope)"
        )
    mm = qwen2_vl_multimodal_config(cfg, text.hidden_size, source)
    for name, token in (
        ("image_token_id", mm.image_token_id),
        ("video_token_id", mm.video_token_id),
        ("vision_start_token_id", mm.vision_start_token_id),
    ):
        if token >= text.vocab_size:
            raise FormatError(
                f"{source}: {name} {token} is outside the vocabulary (vocab_size {text.vocab_size})"
            )
    return replace(text, architecture="qwen2_vl", multimodal=mm)


def _check_layer_list(n_layers: int, source) -> None:
    """Before a per-layer list is built from a layer count that the tensors haven't bounded yet."""
    if n_layers > 65536:
        raise FormatError(f"{source}: num_hidden_layers is {shown(n_layers)}, more than any model has")


# HF model_type -> our architecture name
_MODEL_TYPES = {"gemma3_text": "gemma3"}


def _moe_fields(cfg: dict, arch: str, n_layers: int, source) -> dict:
    """The expert counts and sizes of a mixture-of-experts config (nothing for a dense one)."""
    if arch not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    experts_key = "num_local_experts" if "num_local_experts" in cfg else "num_experts"
    experts = read_int(cfg.get(experts_key), experts_key, source, maximum=4096)
    top_k = read_int(cfg.get("num_experts_per_tok"), "num_experts_per_tok", source, maximum=experts)
    if arch == "mixtral":
        size, shared, norm = read_int(cfg.get("intermediate_size"), "intermediate_size", source), 0, True
    else:
        size = read_int(cfg.get("moe_intermediate_size"), "moe_intermediate_size", source)
        shared = 0
        if arch == "qwen2_moe":
            shared = read_int(
                cfg.get("shared_expert_intermediate_size"), "shared_expert_intermediate_size", source
            )
        norm = read_bool(cfg.get("norm_topk_prob"), "norm_topk_prob", source)
    step = read_int(cfg.get("decoder_sparse_step", 1), "decoder_sparse_step", source)
    _check_layer_list(n_layers, source)
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < n_layers for i in dense):
        raise FormatError(f"{source}: mlp_only_layers is {shown(dense)}, not a list of layer numbers")
    dense = sorted({*dense, *(i for i in range(n_layers) if (i + 1) % step)})
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": size,
        "shared_expert_intermediate_size": shared,
        "norm_topk_prob": norm,
        "dense_layers": tuple(dense),
    }


_SAFETENSORS_DTYPES = {
    "I16": torch.int16,
    "I32": torch.int32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
}


class HFCheckpoint:
    """An HF folder with ``config.json`` and ``model.safetensors``, a sharded index, or (as
    exllamav2 writes them) other ``*.safetensors`` files.

    Opening reads config.json and every safetensors header (not the tensor data), and checks that
    the config's layer count and embedding size agree with the tensors the files hold. In a GPTQ,
    AWQ or EXL2 checkpoint every quantized linear's parts are checked too (shapes and dtypes from
    the headers; g_idx, q_groups, the permutations and q_scale_max read), and ``weights()`` yields
    each as one ``<prefix>.weight`` GPTQTensor or EXL2Tensor. EXL2 is recognised by its
    ``*.q_weight`` tensors where config.json has no quantization_config (exllamav2 converts
    without signing the config unless asked to).
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        if not self.path.is_dir():
            raise FormatError(f"{self.path}: no such folder")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FormatError(f"{self.path}: no config.json (is this an HF model folder?)")
        self.config = config_from_hf_dict(read_json_object(config_path), str(config_path))
        gen = self.path / "generation_config.json"
        self.generation_config = read_json_object(gen) if gen.is_file() else {}
        self._gen_eos = read_token_ids(self.generation_config.get("eos_token_id"), "eos_token_id", gen)
        self._files = self._weight_files()
        self.quantization = self.config.quantization
        self._quantized: dict[str, set[str]] = {}  # quantized linear prefix -> its parts present
        self._module_quant: dict[str, GPTQConfig] = {}  # GPTQ/AWQ linear prefix -> its settings
        self._check_files(config_path)

    def _weight_files(self) -> dict[str, list[str]]:
        """safetensors file -> the tensor names it should hold."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index}: has no weight_map")
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                if not isinstance(file, str) or Path(file).name != file:
                    raise FormatError(
                        f"{index}: tensor {short_name(str(name))} maps to {shown(file)}, not a file name"
                    )
                files.setdefault(file, []).append(name)
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return {"model.safetensors": []}
        found = sorted(p.name for p in self.path.glob("*.safetensors") if p.is_file())
        if found:  # exllamav2's output.safetensors, output-00001-of-00002.safetensors, ...
            return {name: [] for name in found}
        raise FormatError(f"{self.path}: no *.safetensors files (nor model.safetensors.index.json)")

    def _check_files(self, config_path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        layers: set[int] = set()
        embedding: tuple[str, str, tuple[int, ...]] | None = None  # (name, file, shape)
        quant_headers: dict[str, dict[str, tuple]] = {}  # prefix -> part -> (shape, dtype, file)
        for file, expected in self._files.items():
            path = self.path / file
            if not path.is_file():
                raise FormatError(f"{path}: listed in the index but missing")
            try:
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys())
                    parts = PARTS if isinstance(self.quantization, GPTQConfig) else EXL2_PARTS
                    for key in keys:
                        if _EMBEDDING.fullmatch(key):
                            embedding = (key, file, tuple(f.get_slice(key).get_shape()))
                        prefix, _, part = key.rpartition(".")
                        if part in parts:
                            s = f.get_slice(key)
                            dtype = _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype())
                            shape = tuple(s.get_shape())
                            quant_headers.setdefault(prefix, {})[part] = (shape, dtype, file)
            except (SafetensorError, OSError) as e:
                raise FormatError(f"{path}: not a readable safetensors file ({e})") from e
            missing = [n for n in expected if n not in keys]
            if missing:
                raise FormatError(f"{path}: tensor {missing[0]} is listed in the index but absent")
            for key in keys:
                m = _LAYER_TENSOR.fullmatch(key)
                if m:
                    layers.add(int(m.group(1)))
        if self.quantization is None and quant_headers:
            self.quantization = EXL2Config()
            self.config = replace(self.config, quantization=self.quantization)
        if isinstance(self.quantization, EXL2Config):
            self._check_exl2(quant_headers)
        elif self.quantization is not None:
            self._check_quantized(quant_headers)
        c = self.config
        holder = next(iter(self._files)) if len(self._files) == 1 else "the sharded checkpoint"
        check_layer_count(c.num_hidden_layers, "num_hidden_layers", config_path, layers, holder, "layer")
        if embedding is not None:
            name, file, shape = embedding
            keys = ("vocab_size", "hidden_size")
            check_embedding(c.vocab_size, c.hidden_size, keys, config_path, f"{name} in {file}", shape)

    def _check_quantized(self, headers: dict[str, dict[str, tuple]]) -> None:
        from safetensors import safe_open

        quant = self.quantization
        for prefix, parts in headers.items():
            if "qweight" not in parts:
                part = next(iter(parts))
                raise FormatError(
                    f"{self.path / parts[part][2]}: tensor {prefix}.{part} has no {prefix}.qweight beside it"
                )
            source = self.path / parts["qweight"][2]
            cfg = quant.for_module(prefix)
            if cfg is None:
                raise FormatError(
                    f"{source}: tensor {prefix}.qweight is quantized, but {quant.skipped_by(prefix)} "
                    "leaves it unquantized"
                )
            if is_lm_head(prefix) and self.config.tie_word_embeddings:
                raise FormatError(
                    f"{source}: tensor {prefix}.qweight is a quantized LM head, but tie_word_embeddings is "
                    f"true in {self.path / 'config.json'} (a quantized head is its own weight)"
                )
            shapes = {k: v[0] for k, v in parts.items()}
            dtypes = {k: v[1] for k, v in parts.items()}
            n_out, _ = check_gptq_shapes(prefix, shapes, dtypes, cfg, source)
            # the small parts are read now, so that a bad one is refused before anything loads
            if "g_idx" in parts:
                with safe_open(self.path / parts["g_idx"][2], framework="pt") as f:
                    g_idx = f.get_tensor(f"{prefix}.g_idx")
                check_g_idx(prefix, g_idx, shapes["scales"][0], cfg, source)
            if cfg.sym:
                with safe_open(self.path / parts["qzeros"][2], framework="pt") as f:
                    qzeros = f.get_tensor(f"{prefix}.qzeros")
                check_sym_zeros(prefix, qzeros, n_out, cfg, source)
            self._quantized[prefix] = set(parts)
            self._module_quant[prefix] = cfg
        head_cfg = quant.for_module("lm_head")
        if quant.lm_head and head_cfg is not None and not any(map(is_lm_head, self._quantized)):
            raise FormatError(
                f"{self.path / 'config.json'}: quantization_config.lm_head is true, but the checkpoint "
                "has no quantized LM head (no lm_head.qweight)"
            )
        if not self._quantized:
            raise FormatError(
                f"{self.path / 'config.json'}: quantization_config says {self.quantization.quant_method}, "
                "but no tensor is a quantized linear (no *.qweight)"
            )

    def _check_exl2(self, headers: dict[str, dict[str, tuple]]) -> None:
        from safetensors import safe_open

        def read(prefix: str, part: str, parts: dict) -> torch.Tensor:
            with safe_open(self.path / parts[part][2], framework="pt") as f:
                return f.get_tensor(f"{prefix}.{part}")

        for prefix, parts in headers.items():
            if "q_weight" not in parts:
                part = next(iter(parts))
                raise FormatError(
                    f"{self.path / parts[part][2]}: tensor {prefix}.{part} has no {prefix}.q_weight beside it"
                )
            source = self.path / parts["q_weight"][2]
            shapes = {k: v[0] for k, v in parts.items()}
            dtypes = {k: v[1] for k, v in parts.items()}
            _, n_in, _ = check_exl2_headers(prefix, shapes, dtypes, source)
            # the small parts are read now, so that a bad one is refused before anything loads
            read_group_layout(prefix, read(prefix, "q_groups", parts), shapes["q_weight"][0], n_in, source)
            q_perm = read(prefix, "q_perm", parts) if "q_perm" in parts else None
            check_perm(prefix, read(prefix, "q_invperm", parts), q_perm, source)
            check_scale_max(prefix, read(prefix, "q_scale_max", parts), source)
            self._quantized[prefix] = set(parts)
        if not self._quantized:
            raise FormatError(
                f"{self.path / 'config.json'}: quantization_config says exl2, "
                "but no tensor is a quantized linear (no *.q_weight)"
            )

    def tokenizer(self) -> Tokenizer:
        eos_ids = self._gen_eos + self.config.eos_token_ids
        return Tokenizer.from_hf_folder(self.path, eos_token_ids=tuple(dict.fromkeys(eos_ids)))

    def weights(self) -> Iterator[tuple[str, torch.Tensor | GPTQTensor | EXL2Tensor]]:
        """(name, tensor) of every tensor; a GPTQ/AWQ/EXL2 linear as one ``<prefix>.weight``
        GPTQTensor or EXL2Tensor, yielded once all its parts (which may lie in different shards)
        have been read."""
        from safetensors import SafetensorError, safe_open

        exl2 = isinstance(self.quantization, EXL2Config)
        part_names = EXL2_PARTS if exl2 else PARTS
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for file in self._files:
            path = self.path / file
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        prefix, _, part = name.rpartition(".")
                        if prefix not in self._quantized or part not in part_names:
                            yield name, f.get_tensor(name)
                            continue
                        parts = pending.setdefault(prefix, {})
                        parts[part] = f.get_tensor(name)
                        if set(parts) == self._quantized[prefix]:
                            del pending[prefix]
                            if exl2:
                                yield f"{prefix}.weight", exl2_tensor(prefix, parts, path)
                            else:
                                cfg = self._module_quant[prefix]
                                yield f"{prefix}.weight", gptq_tensor(prefix, parts, cfg, path)
            except SafetensorError as e:
                raise FormatError(f"{path}: damaged tensor data ({e})") from e
