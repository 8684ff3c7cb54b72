"""Opening any checkpoint tessera reads, by what the path is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from .config import ModelConfig
from .errors import FormatError
from .gguf_checkpoint import GGUFCheckpoint
from .hf_checkpoint import HFCheckpoint
from .quantized import QuantizedTensor
from .tokenizer import Tokenizer


class Checkpoint(Protocol):
    path: Path
    config: ModelConfig
    generation_config: dict

    def tokenizer(self) -> Tokenizer: ...

    def weights(self) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]: ...


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A ``.gguf`` file or an HF folder; anything else is a FormatError naming the path."""
    p = Path(path)
    if p.is_dir():
        return HFCheckpoint(p)
    if p.is_file():
        with p.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return GGUFCheckpoint(p)
        raise FormatError(f"{p}: not a GGUF file (magic {magic!r}) nor an HF model folder")
    raise FormatError(f"{p}: no such file or folder")
