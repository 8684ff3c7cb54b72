"""Qwen2-VL's config.json: its Qwen2 language model (``text_config`` in transformers 5, the top
level in 4.x) with M-RoPE, its vision transformer (``vision_config``), and the image, video and
vision-start tokens.

A missing field takes the default of transformers' config class, as transformers fills it.
"""

from __future__ import annotations

from .config import MultiModalConfig, Qwen2VLVisionConfig
from .config_values import read_bool, read_float, read_int, shown
from .errors import FormatError
from .llava_config import activation, sub_config

# Qwen2VLTextConfig's defaults
_TEXT_DEFAULTS = {
    "vocab_size": 152064,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
_TEXT_ROPE_THETA = 1000000.0
# Qwen2VLVisionConfig's
_VISION_DEFAULTS = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 3584,
    "hidden_act": "quick_gelu",
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# Qwen2VLConfig's
_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652}


def mrope_scaling(section, head_dim: int, source) -> dict:
    """``rope_scaling`` for M-RoPE: ``mrope_section`` (t, h, w) frequencies of the head_dim / 2."""
    if not isinstance(section, (list, tuple)) or len(section) != 3:
        raise FormatError(f"{source}: mrope_section is {shown(section)}, not three integers (t, h, w)")
    section = tuple(read_int(s, "mrope_section", source, minimum=0, maximum=1 << 16) for s in section)
    if sum(section) != head_dim // 2:
        raise FormatError(
            f"{source}: mrope_section {list(section)} sums to {sum(section)}, "
            f"not head_dim / 2 = {head_dim // 2}"
        )
    return {"rope_type": "mrope", "mrope_section": section}


def qwen2_vl_text_config(cfg: dict, source) -> dict:
    """The language model's config.json fields as a Qwen2 model's, with Qwen2VLTextConfig's
    defaults."""
    nested = sub_config(cfg, "text_config", source)
    if nested is None:  # 4.x: the language model's fields are the top level's
        text = {k: v for k, v in cfg.items() if k not in ("vision_config", *_TOKENS)}
    else:
        text = dict(nested)
        for key in ("torch_dtype", "dtype", "quantization_config"):  # 5.x writes these at the top
            if key in cfg:
                text.setdefault(key, cfg[key])
    text = {**_TEXT_DEFAULTS, **text, "model_type": "qwen2"}
    rope = text.get("rope_parameters")
    if "rope_theta" not in text and not (isinstance(rope, dict) and "rope_theta" in rope):
        text["rope_theta"] = _TEXT_ROPE_THETA
    # transformers ties the embeddings where either level says so
    tie = read_bool(cfg.get("tie_word_embeddings"), "tie_word_embeddings", source)
    if nested is not None:
        tie |= read_bool(nested.get("tie_word_embeddings"), "text_config.tie_word_embeddings", source)
    text["tie_word_embeddings"] = tie
    return text


def qwen2_vl_multimodal_config(cfg: dict, text_hidden: int, source) -> MultiModalConfig:
    """The vision transformer and special tokens of a Qwen2-VL config.json."""
    given = sub_config(cfg, "vision_config", source) or {}
    vision = {**_VISION_DEFAULTS, **given}
    if "in_chans" in given and "in_channels" not in given:  # 4.x's name
        vision["in_channels"] = given["in_chans"]
    kind = vision.get("model_type", "qwen2_vl_vision")
    if kind not in ("qwen2_vl_vision", "qwen2_vl"):
        raise FormatError(
            f"{source}: vision_config.model_type {shown(kind)} is not supported (supported: qwen2_vl_vision)"
        )

    def size(key: str, maximum: int = 1 << 16) -> int:
        return read_int(vision[key], f"vision_config.{key}", source, maximum=maximum)

    embed, heads = size("embed_dim"), size("num_heads")
    if embed % heads or (embed // heads) % 4:
        raise FormatError(
            f"{source}: vision_config.embed_dim {embed} over num_heads {heads} is not a head size that "
            "is a multiple of 4 (the 2-D rotary gives each axis half the head in pairs)"
        )
    hidden = size("hidden_size")
    if hidden != text_hidden:
        raise FormatError(
            f"{source}: vision_config.hidden_size {hidden} differs from the language model's hidden_size "
            f"{text_hidden} (the patch merger's output stands for tokens)"
        )
    rope = vision.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise FormatError(f"{source}: vision_config.rope_parameters is {shown(rope)}, not an object")
    tower = Qwen2VLVisionConfig(
        depth=size("depth", maximum=1024),
        embed_dim=embed,
        num_heads=heads,
        mlp_ratio=read_float(vision["mlp_ratio"], "vision_config.mlp_ratio", source),
        hidden_size=hidden,
        patch_size=size("patch_size"),
        temporal_patch_size=size("temporal_patch_size"),
        in_channels=size("in_channels"),
        spatial_merge_size=size("spatial_merge_size"),
        hidden_act=activation(vision["hidden_act"], "vision_config.hidden_act", source),
        rope_theta=read_float(
            rope.get("rope_theta", 10000.0), "vision_config.rope_parameters.rope_theta", source
        ),
    )
    tokens = {k: read_int(cfg.get(k, v), k, source, minimum=0) for k, v in _TOKENS.items()}
    return MultiModalConfig(vision=tower, text_architecture="qwen2", **tokens)
