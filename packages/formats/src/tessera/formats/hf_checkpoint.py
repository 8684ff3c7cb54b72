"""Reading an HF model folder: config.json, (sharded) safetensors, tokenizer, generation config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .errors import FormatError
from .tokenizer import Tokenizer


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not readable JSON ({e})") from e


def config_from_hf_dict(cfg: dict, source: str) -> ModelConfig:
    """Our ModelConfig from the fields of an HF config.json (transformers 4.x or 5.x layout)."""
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FormatError(
            f"{source}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or {})  # transformers 5 keeps theta and scaling here
        rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
            elif scaling["rope_type"] not in ("llama3", "linear", "dynamic"):
                raise FormatError(
                    f"{source}: rope scaling {scaling['rope_type']!r} is not supported "
                    "(supported: llama3, linear, dynamic)"
                )
        sliding = cfg.get("sliding_window")
        if arch == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        layer_types = cfg.get("layer_types")
        if sliding is not None and layer_types is not None and arch == "qwen2":
            layer_types = tuple(layer_types)
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        attn_bias = bool(cfg.get("attention_bias", False))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else attn_bias,
            o_bias=attn_bias if arch == "llama" else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            extra={"layer_types": layer_types} if layer_types else {},
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{source}: config.json is missing or has a bad field ({e!r})") from e


class HFCheckpoint:
    """An HF folder with ``config.json`` and ``model.safetensors`` or a sharded index."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        if not self.path.is_dir():
            raise FormatError(f"{self.path}: no such folder")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FormatError(f"{self.path}: no config.json (is this an HF model folder?)")
        self.config = config_from_hf_dict(_read_json(config_path), str(config_path))
        gen = self.path / "generation_config.json"
        self.generation_config = _read_json(gen) if gen.is_file() else {}
        self._files = self._weight_files()
        self._check_files()

    def _weight_files(self) -> dict[str, list[str]]:
        """safetensors file -> the tensor names it should hold."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index}: has no weight_map")
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return {"model.safetensors": []}
        raise FormatError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def _check_files(self) -> None:
        from safetensors import SafetensorError, safe_open

        for file, expected in self._files.items():
            path = self.path / file
            if not path.is_file():
                raise FormatError(f"{path}: listed in the index but missing")
            try:
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys())
            except (SafetensorError, OSError) as e:
                raise FormatError(f"{path}: not a readable safetensors file ({e})") from e
            missing = [n for n in expected if n not in keys]
            if missing:
                raise FormatError(f"{path}: tensor {missing[0]} is listed in the index but absent")

    def tokenizer(self) -> Tokenizer:
        eos = self.generation_config.get("eos_token_id")
        eos_ids = tuple([eos] if isinstance(eos, int) else eos or ()) + self.config.eos_token_ids
        return Tokenizer.from_hf_folder(self.path, eos_token_ids=tuple(dict.fromkeys(eos_ids)))

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        for file in self._files:
            path = self.path / file
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except SafetensorError as e:
                raise FormatError(f"{path}: damaged tensor data ({e})") from e
