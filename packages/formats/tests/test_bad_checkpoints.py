"""Hostile and damaged model files (bad_files.py) are each one FormatError whose message starts with
the file and names the field or tensor and the bad value, raised before anything is built."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from tessera.formats import FormatError, open_checkpoint  # noqa: E402


def _bad_files():
    spec = importlib.util.spec_from_file_location(
        "tessera_bad_files", Path(__file__).with_name("bad_files.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bad_files = _bad_files()


def open_and_read_tokenizer(path):
    """What the engine does with a model before loading its weights."""
    ck = open_checkpoint(path)
    ck.tokenizer()
    return ck


@pytest.mark.parametrize("case", list(bad_files.CASES))
def test_a_bad_file_is_one_format_error_naming_the_file_and_the_field(tmp_path, case):
    bad = bad_files.CASES[case](tmp_path)
    with pytest.raises(FormatError) as e:
        open_and_read_tokenizer(bad.model)
    message = str(e.value)
    assert message.startswith(f"{bad.source}: "), message
    for fragment in bad.fragments:
        assert fragment in message
    assert "\n" not in message and len(message) < len(str(bad.source)) + 300, message


def test_the_well_formed_files_the_cases_break_open_and_load(tmp_path):
    """Each case is one fault away from a file that loads: the faults, not the builders, fail."""
    from tessera.models import load_model

    for path in (bad_files.write_gguf(tmp_path / "ok.gguf"), bad_files.write_hf(tmp_path / "ok")):
        ck = open_and_read_tokenizer(path)
        assert (ck.config.num_hidden_layers, ck.config.vocab_size) == (1, 16)
        load_model(ck)


def test_a_hf_folder_sharded_across_files_counts_the_layers_of_every_shard(tmp_path):
    import json

    from safetensors.torch import save_file

    tensors = bad_files.hf_tensors(layers=2)
    folder = bad_files.write_hf(tmp_path / "m", {"num_hidden_layers": 2}, tensors={})
    (folder / "model.safetensors").unlink()
    shards = {"a.safetensors": {}, "b.safetensors": {}}
    for name, t in tensors.items():
        shards["b.safetensors" if ".layers.1." in name else "a.safetensors"][name] = t
    for file, part in shards.items():
        save_file(part, str(folder / file))
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert open_checkpoint(folder).config.num_hidden_layers == 2
    (folder / "config.json").write_text(json.dumps({**bad_files.HF_CONFIG, "num_hidden_layers": 3}))
    with pytest.raises(
        FormatError, match=r"num_hidden_layers is 3 but the sharded checkpoint holds tensors of 2 layers"
    ):
        open_checkpoint(folder)


def test_a_block_numbered_past_block_count_is_refused(tmp_path):
    tensors = bad_files.gguf_tensors(layers=2)
    tensors = {k.replace("blk.1.", "blk.7."): v for k, v in tensors.items()}
    p = bad_files.write_gguf(tmp_path / "gap.gguf", {"llama.block_count": ("uint32", 2)}, tensors)
    with pytest.raises(
        FormatError, match=r"gap.gguf: llama.block_count is 2 but .* 2 blocks \(numbered up to 7\)"
    ):
        open_checkpoint(p)
