"""Fixtures shared by every package's tests: the default model and its HF reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from tessera.engine import DEFAULT_MODEL, resolve_model
    from tessera.formats import FormatError

    try:
        return resolve_model(DEFAULT_MODEL)
    except FormatError as err:  # a machine without the model's package (a GPU box that can't pip)
        pytest.skip(f"default model not available: {err}")


@pytest.fixture(scope="session")
def gemma3_model_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF), joined from its part packages into the cache on first use."""
    import importlib.util

    from tessera.engine import KNOWN_MODELS, resolve_model

    model = KNOWN_MODELS["gemma-3-270m"]
    packages = [package for package, _ in (*model.parts, model.sums)]
    if any(importlib.util.find_spec(p) is None for p in packages):
        pytest.skip("Gemma 3 270M is not installed (an optional extra): uv sync --extra gemma")
    return resolve_model("gemma-3-270m")  # installed but damaged fails here, loudly


def _optional_model(name: str, extra: str) -> Path:
    """The known model ``name`` from its optional part packages (``uv sync --extra EXTRA``), joined
    into the cache on first use; skipped where they are not installed."""
    import importlib.util

    from tessera.engine import KNOWN_MODELS, resolve_model

    model = KNOWN_MODELS[name]
    packages = [package for package, _ in model.parts]
    if not isinstance(model.sums, str):
        packages.append(model.sums[0])
    if any(importlib.util.find_spec(p) is None for p in packages):
        pytest.skip(f"{name} is not installed (an optional extra): uv sync --extra {extra}")
    return resolve_model(name)  # installed but damaged fails here, loudly


@pytest.fixture(scope="session")
def qwen_draft_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF): the draft of the speculative-decoding pair."""
    return _optional_model("qwen2.5-coder-0.5b-instruct", "qwen")


@pytest.fixture(scope="session")
def qwen_target_path() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF): the target of the speculative-decoding pair."""
    return _optional_model("qwen2.5-coder-1.5b-instruct", "qwen")


@pytest.fixture(scope="session")
def hf_default_model(default_model_path):
    """transformers' own GGUF loader on the default model, fp32: the reference."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_default_tokenizer(default_model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name
    )


@pytest.fixture(scope="session")
def default_llm(default_model_path):
    from tessera.engine import LLM

    return LLM(
        model=str(default_model_path), dtype="float32", kv_cache_memory=256 * 2**20, max_model_len=2048
    )
