"""Short model names: a file inside a package, or parts joined once into the cache and checked."""

import hashlib
import json
import os
import time

import pytest

from tessera.engine import KNOWN_MODELS, model_source, resolve_model
from tessera.engine.model_source import AssembledModel, PackagedModel, cache_dir
from tessera.formats import FormatError

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"\x00\xff" * 3000, b"the last part"]
WHOLE = b"".join(PARTS)
FILE = "toy.gguf"


def _write_packages(root, parts=PARTS, digest=None):
    """Fake part packages toy_part1..N (data/toy.gguf.partNN) and toy_sums (data/SHA256SUMS)."""
    for i, data in enumerate(parts):
        folder = root / f"toy_part{i + 1}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"{FILE}.part{i:02d}").write_bytes(data)
    sums = root / "toy_sums" / "data"
    sums.mkdir(parents=True)
    (sums.parent / "__init__.py").write_text("")
    digest = digest or hashlib.sha256(WHOLE).hexdigest()
    (sums / "SHA256SUMS").write_text(f"{'0' * 64}  other.gguf\n{digest}  {FILE}\n")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The short name "toy" for a model in three part packages; the cache in tmp_path/cache."""
    _write_packages(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    model = AssembledModel(
        FILE,
        parts=tuple((f"toy_part{i + 1}", f"data/{FILE}.part{i:02d}") for i in range(len(PARTS))),
        sums=("toy_sums", "data/SHA256SUMS"),
        install="pip install toy",
    )
    monkeypatch.setitem(KNOWN_MODELS, "toy", model)
    return tmp_path


def _cache_listing(toy):
    return sorted(p.name for p in (toy / "cache" / "models").iterdir())


def test_a_model_in_parts_is_joined_into_the_cache_and_its_digest_recorded(toy):
    path = resolve_model("toy")
    assert path == toy / "cache" / "models" / FILE
    assert path.read_bytes() == WHOLE
    marker = json.loads((path.parent / f"{FILE}.verified").read_text())
    assert marker["sha256"] == hashlib.sha256(WHOLE).hexdigest()
    assert marker["size"] == len(WHOLE)
    assert _cache_listing(toy) == [FILE, f"{FILE}.verified"]  # no temporary file left


def test_a_second_resolve_trusts_the_marker_and_joins_nothing(toy, monkeypatch):
    first = resolve_model("toy")
    mtime = first.stat().st_mtime_ns

    def join(*args):
        raise AssertionError("joined the parts again")

    monkeypatch.setattr(model_source, "_join", join)
    assert resolve_model("toy") == first
    assert first.stat().st_mtime_ns == mtime


def test_a_damaged_part_is_refused_with_both_digests_and_leaves_no_file(toy):
    part = toy / "site" / "toy_part2" / "data" / f"{FILE}.part01"
    part.write_bytes(b"\x00\xfe" + part.read_bytes()[2:])
    with pytest.raises(FormatError) as err:
        resolve_model("toy")
    damaged = hashlib.sha256(WHOLE.replace(b"\x00\xff", b"\x00\xfe", 1)).hexdigest()
    message = str(err.value)
    assert FILE in message and "SHA256SUMS" in message and "pip install toy" in message
    assert hashlib.sha256(WHOLE).hexdigest() in message and damaged in message
    assert _cache_listing(toy) == []


def test_a_file_in_the_cache_without_a_marker_is_not_trusted(toy):
    target = cache_dir() / FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(WHOLE[: len(WHOLE) // 2])  # as a killed copy by hand would leave it
    assert resolve_model("toy").read_bytes() == WHOLE


def test_a_file_changed_after_it_was_checked_is_joined_again(toy):
    path = resolve_model("toy")
    time.sleep(0.01)
    path.write_bytes(b"X" * len(WHOLE))  # same size, new mtime
    assert resolve_model("toy").read_bytes() == WHOLE


def test_a_new_digest_in_sha256sums_joins_the_parts_again(toy, monkeypatch):
    path = resolve_model("toy")
    sums = toy / "site" / "toy_sums" / "data" / "SHA256SUMS"
    sums.write_text(f"{'ab' * 32}  {FILE}\n")  # an upgraded package whose parts differ
    with pytest.raises(FormatError, match="ab" * 32):
        resolve_model("toy")
    assert path.read_bytes() == WHOLE  # the checked file from before stays


def test_temporary_files_of_killed_assemblies_are_removed_and_running_ones_kept(toy):
    models = cache_dir()
    models.mkdir(parents=True)
    abandoned, running = models / f".{FILE}.killed.tmp", models / f".{FILE}.running.tmp"
    abandoned.write_bytes(b"half")
    running.write_bytes(b"half")
    hour_ago = time.time() - 3600
    os.utime(abandoned, (hour_ago, hour_ago))
    resolve_model("toy")
    assert not abandoned.exists() and running.exists()


@pytest.mark.parametrize("damaged", [False, True])
def test_parts_checked_against_a_digest_pinned_in_the_code(toy, monkeypatch, damaged):
    """Part packages that ship no SHA256SUMS (the Qwen2.5-Coder parts): the digest is pinned in
    KNOWN_MODELS, and a damaged part is refused the same way."""
    model = KNOWN_MODELS["toy"]
    pinned = AssembledModel(FILE, model.parts, hashlib.sha256(WHOLE).hexdigest(), model.install)
    monkeypatch.setitem(KNOWN_MODELS, "toy", pinned)
    if not damaged:
        assert resolve_model("toy").read_bytes() == WHOLE
        return
    part = toy / "site" / "toy_part3" / "data" / f"{FILE}.part02"
    part.write_bytes(b"THE last part")
    with pytest.raises(FormatError, match="pinned digest"):
        resolve_model("toy")
    assert _cache_listing(toy) == []


@pytest.mark.parametrize(
    ("name", "size"),
    [("qwen2.5-coder-0.5b-instruct", 491_400_064), ("qwen2.5-coder-1.5b-instruct", 1_117_320_768)],
)
def test_the_qwen_coder_pair_are_the_checked_files(name, size):
    try:
        path = resolve_model(name)
    except FormatError as e:
        pytest.skip(f"the optional {name} packages are absent: {e}")
    assert path.stat().st_size == size


def test_missing_part_packages_are_named_with_the_install_command(toy, monkeypatch):
    monkeypatch.setitem(
        KNOWN_MODELS,
        "toy",
        AssembledModel(FILE, (("toy_part1", "x"), ("toy_nope", "y")), ("toy_sums", "z"), "pip install toy"),
    )
    with pytest.raises(FormatError, match=r"model 'toy' needs the package\(s\) toy-nope: pip install toy"):
        resolve_model("toy")


def test_a_file_missing_from_an_installed_package_is_named(toy, monkeypatch):
    monkeypatch.setitem(
        KNOWN_MODELS, "toy", PackagedModel("toy_part1", "data/absent.gguf", "pip install toy")
    )
    with pytest.raises(
        FormatError, match=r"missing from its packages: data/absent.gguf \(package toy_part1\)"
    ):
        resolve_model("toy")


def test_the_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TESSERA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "tessera" / "models"


def test_gemma_3_270m_is_the_checked_253_mb_file_from_its_packages(gemma3_model_path, monkeypatch):
    assert gemma3_model_path.name == "gemma-3-270m-q4_k_m.gguf"
    assert gemma3_model_path.stat().st_size == 253_113_024
    marker = json.loads(gemma3_model_path.with_name(gemma3_model_path.name + ".verified").read_text())
    assert marker["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    with gemma3_model_path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    monkeypatch.setattr(model_source, "_join", lambda *a: pytest.fail("joined the parts again"))
    assert resolve_model("gemma-3-270m") == gemma3_model_path
