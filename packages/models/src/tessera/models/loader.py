"""Building a model from a checkpoint: map names, check every shape, stack fused projections."""

from __future__ import annotations

import re

import torch

from tessera.formats import Checkpoint, FormatError, ModelConfig, QuantizedTensor
from tessera.kernels import RowStack, ops

from .llama import LlamaForCausalLM

MODEL_CLASSES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}

# tensors some checkpoints carry that we recompute
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER = re.compile(r"model\.layers\.(0|[1-9]\d{0,8})\.(.+)")


def _global_and_layer_shapes(
    config: ModelConfig,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Shapes of the tensors outside the layers, and of one layer's tensors (by their name in it)."""
    c = config
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    if c.qkv_bias:
        per_layer |= {
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
        }
    if c.o_bias:
        per_layer["self_attn.o_proj.bias"] = (h,)
    if c.mlp_bias:
        per_layer |= {"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)}
    return shapes, per_layer


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes, per_layer = _global_and_layer_shapes(config)
    for n in range(config.num_hidden_layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{n}.{k}"] = s
    return shapes


def _expected_names(config: ModelConfig):
    shapes, per_layer = _global_and_layer_shapes(config)
    yield from shapes
    for n in range(config.num_hidden_layers):
        for k in per_layer:
            yield f"model.layers.{n}.{k}"


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def _rows(parts: list, dtype: torch.dtype):
    """Projections stacked by output rows (q|k|v, gate|up), prepared for ``ops.linear``: packed
    weights of one scheme are one packed weight (their rows are whole blocks); a mix of schemes
    is a ``RowStack`` of the parts as the backend prepared them, or one tensor where the backend
    dequantized them all."""
    if (
        all(isinstance(p, QuantizedTensor) for p in parts)
        and len({(p.scheme, p.shape[1]) for p in parts}) == 1
    ):
        data = torch.cat([p.data.reshape(p.shape[0], -1) for p in parts])
        stacked = QuantizedTensor(parts[0].scheme, data, (sum(p.shape[0] for p in parts), parts[0].shape[1]))
        return _prepared(stacked, dtype)
    prepared = [_prepared(p, dtype) for p in parts]
    if all(isinstance(p, torch.Tensor) for p in prepared):
        return torch.cat([p.to(dtype) for p in prepared])
    return RowStack(prepared)


def _prepared(weight, dtype: torch.dtype):
    """What ``ops.linear`` multiplies with: a packed weight goes through the kernel backend's
    ``prepare_linear_weight`` (kept packed where the backend can, else dequantized)."""
    if isinstance(weight, QuantizedTensor):
        return ops.prepare_linear_weight(weight, dtype)
    return weight


def load_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress=None,
    packed_weights: bool = False,
) -> LlamaForCausalLM:
    """The model of ``checkpoint`` with weights in ``dtype`` on ``device``.

    Quantized (GGUF) weights are dequantized at load, or with ``packed_weights`` kept packed for
    the kernel backend's own quantized matmul where it has one (the CPU backend: Q4_0, Q4_1,
    Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). ``progress``, if given, is called as
    ``progress(done, total)`` while tensors load.
    """
    config = checkpoint.config
    device = torch.device(device)
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise FormatError(f"{checkpoint.path}: no model class for architecture {config.architecture!r}")
    # shapes are looked up per name, never built for every layer: the layer count comes from a
    # file, and the checkpoint checked it against the tensors present, but a Checkpoint is a protocol
    global_shapes, per_layer = _global_and_layer_shapes(config)

    def expected(name: str) -> tuple[int, ...] | None:
        if name in global_shapes:
            return global_shapes[name]
        m = _LAYER.fullmatch(name)
        if m is None or int(m.group(1)) >= config.num_hidden_layers:
            return None
        return per_layer.get(m.group(2))

    tensors: dict[str, torch.Tensor] = {}
    freq_factors = None
    total = len(global_shapes) + config.num_hidden_layers * len(per_layer)
    for name, value in checkpoint.weights():
        if _IGNORED.fullmatch(name):
            continue
        if name == "model.rotary_emb.freq_factors":
            freq_factors = value
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shape = expected(name)
        if shape is None:
            raise FormatError(
                f"{checkpoint.path}: unexpected tensor {name} for a {config.architecture} model"
            )
        if _shape(value) != shape:
            raise FormatError(
                f"{checkpoint.path}: tensor {name} has shape {list(_shape(value))}, "
                f"expected {list(shape)} from the config"
            )
        # the embedding stays packed only when it is also the LM head (rows are gathered from it)
        keep_packed = (
            packed_weights
            and len(value.shape) == 2
            and (name != "model.embed_tokens.weight" or config.tie_word_embeddings)
        )
        if isinstance(value, QuantizedTensor):
            value = value.to(device) if keep_packed else value.to(device).dequantize(dtype)
        else:
            value = value.to(device=device, dtype=dtype)
        tensors[name] = value
        if progress is not None:
            progress(len(tensors), total)
    if len(tensors) < total:
        first = next(n for n in _expected_names(config) if n not in tensors)
        raise FormatError(f"{checkpoint.path}: tensor {first} is missing ({total - len(tensors)} missing)")

    model = cls(config, dtype, device)
    if freq_factors is not None:
        model.rotary.set_freq_factors(freq_factors)
    model.embed_tokens = _prepared(tensors.pop("model.embed_tokens.weight"), dtype)
    model.norm = tensors.pop("model.norm.weight")
    model.lm_head = (
        model.embed_tokens if config.tie_word_embeddings else _prepared(tensors.pop("lm_head.weight"), dtype)
    )
    for n, layer in enumerate(model.layers):
        p = f"model.layers.{n}."

        def take(key: str, p=p):
            return tensors.pop(p + key, None)

        layer.input_norm = take("input_layernorm.weight")
        layer.post_attention_norm = take("post_attention_layernorm.weight")
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_weight = _rows([take(f"self_attn.{x}_proj.weight") for x in "qkv"], dtype)
        if config.qkv_bias:
            attn.qkv_bias = torch.cat([take(f"self_attn.{x}_proj.bias") for x in "qkv"])
        attn.o_weight, attn.o_bias = (
            _prepared(take("self_attn.o_proj.weight"), dtype),
            take("self_attn.o_proj.bias"),
        )
        mlp.gate_up_weight = _rows([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")], dtype)
        if config.mlp_bias:
            mlp.gate_up_bias = torch.cat([take("mlp.gate_proj.bias"), take("mlp.up_proj.bias")])
        mlp.down_weight, mlp.down_bias = (
            _prepared(take("mlp.down_proj.weight"), dtype),
            take("mlp.down_proj.bias"),
        )
    return model
