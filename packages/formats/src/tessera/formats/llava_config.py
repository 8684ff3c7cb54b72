"""LLaVA's config.json: its language model's config (``text_config``), its CLIP vision tower's
(``vision_config``), and how the projector joins them.

transformers 4.x wrote only the fields of a sub-config that differ from that config class's
defaults (llava-hf/llava-1.5-7b-hf's text_config names no hidden_size), so those defaults are
filled in here as transformers fills them.
"""

from __future__ import annotations

from .config import MultiModalConfig, VisionConfig
from .config_values import read_bool, read_float, read_int, shown
from .errors import FormatError

TEXT_ARCHITECTURES = ("llama", "mistral", "qwen2")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu")

# transformers' LlamaConfig defaults
_LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# CLIPVisionConfig's defaults
_CLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# LlavaConfig's vision tower where config.json has no vision_config (CLIP ViT-L/14 at 336 px)
_LLAVA_CLIP = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}


def sub_config(cfg: dict, key: str, source) -> dict | None:
    sub = cfg.get(key)
    if sub is not None and not isinstance(sub, dict):
        raise FormatError(f"{source}: {key} is {shown(sub)}, not an object")
    return sub


def llava_text_config(cfg: dict, source) -> dict:
    """The language model's config.json fields, with the defaults of its config class."""
    text = dict(sub_config(cfg, "text_config", source) or {})
    kind = text.setdefault("model_type", "llama")
    if kind not in TEXT_ARCHITECTURES:
        raise FormatError(
            f"{source}: text_config.model_type {shown(kind)} is not supported in a LLaVA model "
            f"(supported: {', '.join(TEXT_ARCHITECTURES)})"
        )
    if kind == "llama":
        text = {**_LLAMA_DEFAULTS, **text}
    for key in ("torch_dtype", "dtype"):  # 5.x writes the dtype at the top only
        if key in cfg:
            text.setdefault(key, cfg[key])
    return text


def activation(value, key: str, source) -> str:
    if value not in ACTIVATIONS:
        raise FormatError(
            f"{source}: {key} {shown(value)} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    return value


def llava_multimodal_config(cfg: dict, text_architecture: str, source) -> MultiModalConfig:
    """The vision tower and projector of a LLaVA config.json."""
    given = sub_config(cfg, "vision_config", source)
    vision = {**_CLIP_DEFAULTS, **(_LLAVA_CLIP if given is None else given)}
    kind = vision.get("model_type", "clip_vision_model")
    if kind != "clip_vision_model":
        raise FormatError(
            f"{source}: vision_config.model_type {shown(kind)} is not supported "
            "(supported: clip_vision_model)"
        )

    def size(key: str) -> int:
        return read_int(vision[key], f"vision_config.{key}", source, maximum=1 << 16)

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    if hidden % heads:
        raise FormatError(
            f"{source}: vision_config.hidden_size {hidden} is not a multiple of "
            f"vision_config.num_attention_heads {heads}"
        )
    image, patch = size("image_size"), size("patch_size")
    if patch > image:
        raise FormatError(
            f"{source}: vision_config.patch_size {patch} is larger than vision_config.image_size {image}"
        )
    n_layers = read_int(vision["num_hidden_layers"], "vision_config.num_hidden_layers", source, maximum=1024)
    tower = VisionConfig(
        hidden_size=hidden,
        intermediate_size=size("intermediate_size"),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
        num_channels=size("num_channels"),
        layer_norm_eps=read_float(vision["layer_norm_eps"], "vision_config.layer_norm_eps", source),
        hidden_act=activation(vision["hidden_act"], "vision_config.hidden_act", source),
    )

    layers = cfg.get("vision_feature_layer", -2)
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        or not all(-(n_layers + 1) <= i <= n_layers for i in layers)
    ):
        raise FormatError(
            f"{source}: vision_feature_layer is {shown(cfg.get('vision_feature_layer'))}, not a layer "
            f"number (or list of them) of a vision tower with {n_layers} layers"
        )
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise FormatError(
            f"{source}: vision_feature_select_strategy is {shown(strategy)} (supported: default, full)"
        )
    token_key = "image_token_index" if "image_token_index" in cfg else "image_token_id"
    return MultiModalConfig(
        vision=tower,
        text_architecture=text_architecture,
        image_token_id=read_int(cfg.get(token_key, 32000), token_key, source, minimum=0),
        projector_hidden_act=activation(
            cfg.get("projector_hidden_act", "gelu"), "projector_hidden_act", source
        ),
        projector_bias=read_bool(
            cfg.get("multimodal_projector_bias"), "multimodal_projector_bias", source, default=True
        ),
        vision_feature_layers=tuple(layers),
        vision_feature_select_strategy=strategy,
    )
