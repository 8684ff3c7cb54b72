"""Qwen2-VL's config.json read into a ModelConfig: the Qwen2 language model's fields at the top
with M-RoPE in ``rope_scaling``, the vision transformer and special tokens in ``multimodal``;
transformers 4.x's flat layout and 5.x's ``text_config``."""

import pytest

from tessera.formats import FormatError, Qwen2VLVisionConfig
from tessera.formats.hf_checkpoint import config_from_hf_dict

# Qwen/Qwen2-VL-2B-Instruct's config.json (transformers 4.x: the language model at the top)
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# what transformers 5.24's save_pretrained writes for the tiny test model
TINY_5X = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "dtype": "float32",
    "image_token_id": 190,
    "model_type": "qwen2_vl",
    "text_config": {
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 96,
        "layer_types": ["full_attention", "full_attention"],
        "max_position_embeddings": 512,
        "max_window_layers": 80,
        "model_type": "qwen2_vl_text",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"mrope_section": [2, 3, 3], "rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": None,
        "use_sliding_window": False,
        "vocab_size": 200,
    },
    "tie_word_embeddings": False,
    "video_token_id": 191,
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_act": "quick_gelu",
        "hidden_size": 64,
        "in_channels": 3,
        "mlp_ratio": 2,
        "model_type": "qwen2_vl_vision",
        "num_heads": 4,
        "patch_size": 14,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 193,
    "vision_start_token_id": 192,
}


def test_qwen2_vl_2b_flat_config_reads():
    c = config_from_hf_dict(QWEN2_VL_2B, "config.json")
    assert c.architecture == "qwen2_vl"
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.head_dim) == (151936, 1536, 28, 128)
    assert (c.rope_theta, c.tie_word_embeddings, c.qkv_bias, c.sliding_window) == (1e6, True, True, None)
    assert c.rope_scaling == {"rope_type": "mrope", "mrope_section": (16, 24, 24)}
    mm = c.multimodal
    assert mm.text_architecture == "qwen2"
    assert (mm.image_token_id, mm.video_token_id, mm.vision_start_token_id) == (151655, 151656, 151652)
    assert mm.vision == Qwen2VLVisionConfig(
        depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0, hidden_size=1536
    )
    assert (mm.vision.mlp_hidden, mm.vision.patch_features, mm.spatial_merge_size) == (5120, 1176, 2)
    assert mm.tokens_per_image is None


def test_transformers_5_nested_config_reads():
    c = config_from_hf_dict(TINY_5X, "config.json")
    assert (c.architecture, c.vocab_size, c.hidden_size, c.head_dim) == ("qwen2_vl", 200, 64, 16)
    assert (c.rope_theta, c.tie_word_embeddings, c.torch_dtype) == (10000.0, False, "float32")
    assert c.rope_scaling == {"rope_type": "mrope", "mrope_section": (2, 3, 3)}
    v = c.multimodal.vision
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_hidden, v.hidden_size) == (2, 32, 4, 64, 64)
    assert c.multimodal.video_token_id == 191


def test_missing_fields_take_transformers_defaults():
    cfg = {"model_type": "qwen2_vl", "text_config": {}, "vision_config": {"hidden_size": 8192}}
    c = config_from_hf_dict(cfg, "config.json")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.head_dim) == (152064, 8192, 80, 128)
    assert (c.rope_theta, c.rms_norm_eps, c.eos_token_ids) == (1e6, 1e-5, (151645,))
    assert c.rope_scaling["mrope_section"] == (16, 24, 24)
    v = c.multimodal.vision
    assert (v.depth, v.embed_dim, v.num_heads, v.hidden_act) == (32, 1280, 16, "quick_gelu")
    assert c.multimodal.image_token_id == 151655
    # the vision default hidden_size (3584) is not this language model's
    with pytest.raises(FormatError, match="vision_config.hidden_size 3584 differs"):
        config_from_hf_dict({**cfg, "vision_config": {}}, "config.json")


def nested(**changes):
    return {**TINY_5X, **changes}


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            {**QWEN2_VL_2B, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}},
            r"mrope_section \[16, 24, 16\] sums to 56, not head_dim / 2 = 64",
        ),
        (
            {**QWEN2_VL_2B, "rope_scaling": {"type": "mrope", "mrope_section": [64]}},
            "not three integers",
        ),
        (
            {**QWEN2_VL_2B, "rope_scaling": {"type": "linear", "factor": 2.0}},
            "rope scaling 'linear' is not supported in a Qwen2-VL model",
        ),
        (nested(image_token_id=200), "image_token_id 200 is outside the vocabulary"),
        (nested(vision_config={**TINY_5X["vision_config"], "num_heads": 3}), "not a head size"),
        (
            nested(vision_config={"model_type": "siglip_vision_model"}),
            "siglip_vision_model' is not supported",
        ),
        (
            nested(vision_config={**TINY_5X["vision_config"], "hidden_act": "relu6"}),
            "'relu6' is not supported",
        ),
    ],
)
def test_bad_qwen2_vl_fields_are_named(cfg, message):
    with pytest.raises(FormatError, match=message):
        config_from_hf_dict(cfg, "config.json")
