"""LLaVA's config.json read into a ModelConfig: the language model's fields at the top, the vision
tower and projector in ``multimodal``; transformers' defaults where a 4.x config leaves them out."""

import pytest

from tessera.formats import FormatError
from tessera.formats.hf_checkpoint import config_from_hf_dict

# llava-hf/llava-1.5-7b-hf's config.json (transformers 4.x wrote only non-default fields)
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def test_llava_15_config_reads_with_transformers_defaults():
    c = config_from_hf_dict(LLAVA_15_7B, "config.json")
    assert c.architecture == "llava"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (32064, 4096, 11008)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (32, 32, 32)
    assert (c.max_position_embeddings, c.rms_norm_eps, c.eos_token_ids) == (4096, 1e-5, (2,))
    mm = c.multimodal
    assert mm.text_architecture == "llama"
    assert (mm.vision.hidden_size, mm.vision.num_hidden_layers, mm.vision.image_size) == (1024, 24, 336)
    assert (mm.vision.hidden_act, mm.vision.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert (mm.image_token_id, mm.vision_feature_layers, mm.tokens_per_image) == (32000, (-2,), 576)


def test_a_text_model_has_no_multimodal_config():
    text = {**LLAVA_15_7B["text_config"], "hidden_size": 64, "intermediate_size": 96}
    text |= {"num_hidden_layers": 2, "num_attention_heads": 4}
    assert config_from_hf_dict(text, "config.json").multimodal is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision_feature_select_strategy": "pooled"}, "vision_feature_select_strategy is 'pooled'"),
        ({"vision_feature_layer": 25}, "vision_feature_layer is 25, not a layer number"),
        ({"image_token_index": 40000}, "image token id 40000 is outside the vocabulary"),
        ({"projector_hidden_act": "relu6"}, "projector_hidden_act 'relu6' is not supported"),
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "siglip_vision_model' is not supported"),
        ({"text_config": {"model_type": "gemma"}}, "text_config.model_type 'gemma' is not supported"),
    ],
)
def test_bad_llava_fields_are_named(change, message):
    with pytest.raises(FormatError, match=message):
        config_from_hf_dict({**LLAVA_15_7B, **change}, "config.json")
