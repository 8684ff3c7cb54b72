"""Our GGUF container reader against the gguf package's own GGUFReader on the same files."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from tessera.formats.gguf_file import GGUFFile  # noqa: E402


def assert_same_as_gguf_reader(path):
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    theirs_fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == theirs_fields.keys()
    for key, value in theirs_fields.items():
        if isinstance(value, float):
            assert ours.fields[key] == pytest.approx(value), key
        else:
            assert ours.fields[key] == value, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(int(x) for x in b.shape))
        assert (a.data_offset, a.n_bytes) == (b.data_offset, b.n_bytes)
        assert np.array_equal(a.data, np.asarray(b.data).reshape(-1).view(np.uint8))


def test_the_default_model_reads_as_gguf_reads_it(default_model_path):
    assert_same_as_gguf_reader(default_model_path)


def test_every_value_type_round_trips_through_gguf_writer(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.125)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**60))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "bb", ""])
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf_reader(path)
    f = GGUFFile(path)
    assert f.fields["t.str"] == "héllo ✓" and f.fields["t.strs"] == ["a", "bb", ""]
    assert np.array_equal(f.tensors[0].data.view(np.float32).reshape(3, 4), np.arange(12).reshape(3, 4))


def test_damaged_files_raise_value_error(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("t.strs", ["x" * 100] * 10)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = path.read_bytes()
    for cut in (3, 30, len(data) - 50):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            GGUFFile(bad)
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        GGUFFile(bad)
