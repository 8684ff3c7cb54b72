"""Damaged or unsupported inputs raise a FormatError that names the file and the problem."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tessera.formats import FormatError, open_checkpoint  # noqa: E402
from tessera.formats.hf_checkpoint import config_from_hf_dict  # noqa: E402


def write_tiny_gguf(path, arch="llama", extra_tensor=None):
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    if extra_tensor is not None:
        name, raw, qtype, shape = extra_tensor
        w.add_tensor(name, raw, raw_shape=shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FormatError, match="nope.gguf: no such file"):
        open_checkpoint(tmp_path / "nope.gguf")


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(FormatError, match="notes.txt: not a GGUF file"):
        open_checkpoint(p)


@pytest.mark.parametrize("keep", [100, 4_000_000, 60_000_000])
def test_truncated_gguf_is_refused(default_model_path, tmp_path, keep):
    p = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as f:
        p.write_bytes(f.read(keep))
    with pytest.raises(FormatError, match="cut.gguf") as e:
        open_checkpoint(p)
    assert "truncated" in str(e.value) or "not a readable GGUF" in str(e.value)


def test_unknown_tensor_type_is_named(tmp_path):
    qtype = gguf.GGMLQuantizationType.IQ2_XXS
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((32, size), np.uint8)  # 32 rows of one 256-value block
    p = write_tiny_gguf(tmp_path / "iq.gguf", extra_tensor=("blk.0.attn_q.weight", raw, qtype, (32, size)))
    with pytest.raises(
        FormatError, match=r"iq.gguf: tensor blk.0.attn_q.weight has type IQ2_XXS.*supported: .*Q4_K"
    ):
        open_checkpoint(p)


def test_unknown_gguf_architecture_is_named(tmp_path):
    p = write_tiny_gguf(tmp_path / "g.gguf", arch="falcon")
    with pytest.raises(
        FormatError,
        match=r"g.gguf: architecture 'falcon' is not supported \(supported: llama, qwen2, gemma3, qwen2moe, ",
    ):
        open_checkpoint(p)


def _hf_folder(tmp_path, config: dict, tensors: dict):
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


TINY = {
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


def test_unknown_hf_architecture_is_named(tmp_path):
    folder = _hf_folder(tmp_path / "m", {**TINY, "model_type": "bloom"}, {"x": torch.zeros(1)})
    with pytest.raises(FormatError, match=r"config.json: architecture 'bloom' is not supported"):
        open_checkpoint(folder)


def test_hf_folder_without_config_is_named(tmp_path):
    with pytest.raises(FormatError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    from tessera.models import expected_shapes, load_model

    tensors = {
        k: torch.zeros(s) for k, s in expected_shapes(config_from_hf_dict(TINY, "config.json")).items()
    }
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(15, 8)
    ck = open_checkpoint(_hf_folder(tmp_path / "m", TINY, tensors))
    with pytest.raises(
        FormatError, match=r"tensor model.layers.0.mlp.up_proj.weight has shape \[15, 8\], expected \[16, 8\]"
    ):
        load_model(ck)


def test_missing_tensor_is_named(tmp_path):
    from tessera.models import expected_shapes, load_model

    tensors = {
        k: torch.zeros(s) for k, s in expected_shapes(config_from_hf_dict(TINY, "config.json")).items()
    }
    del tensors["model.norm.weight"]
    with pytest.raises(FormatError, match="tensor model.norm.weight is missing"):
        load_model(open_checkpoint(_hf_folder(tmp_path / "m", TINY, tensors)))


def test_corrupt_safetensors_is_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="model.safetensors: not a readable safetensors file"):
        open_checkpoint(folder)


def test_sharded_index_pointing_at_a_missing_shard_is_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(
        FormatError, match="model-00002-of-00002.safetensors: listed in the index but missing"
    ):
        open_checkpoint(folder)
