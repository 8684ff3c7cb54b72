"""Calibration and evaluation text from one file, split so that they never share a document.

Conversion measures and quantizes on calibration rows; ``tessera eval`` scores on held-out
text. Both come from here, from the same split, so an evaluation never sees a row that
calibrated the model it scores. A file in WikiExtractor's ``<doc ...>`` format (the default,
``../shared/data/wiki.utf8``: 2,349 Wikipedia articles, exllamav2's own calibration file) is cut
into its documents; any other text into paragraphs (blank-line separated). Every fifth
document (index 4, 9, 14, ...) is held out for evaluation; the others calibrate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError

HELD_OUT_EVERY = 5  # document i is held out where i % 5 == 4
DEFAULT_TEXT = Path(__file__).resolve().parents[5] / ".." / "shared" / "data" / "wiki.utf8"
_DOC = re.compile(r"<doc [^>]*>\n?(.*?)</doc>", re.S)


def default_text() -> Path:
    """``../shared/data/wiki.utf8`` next to the project checkout (it may be absent)."""
    return DEFAULT_TEXT.resolve()


def documents(path: Path | str) -> list[str]:
    """The file's documents, in order (``<doc>`` bodies, else paragraphs), stripped, none empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{path}: no such calibration/evaluation text file") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = _DOC.findall(text) if "<doc " in text else re.split(r"\n\s*\n", text)
    return [d.strip() for d in docs if d.strip()]


@dataclass(frozen=True)
class TextSplit:
    calibration: list[str]
    evaluation: list[str]


def split_text(path: Path | str) -> TextSplit:
    """The file's documents, split: every fifth held out for evaluation."""
    docs = documents(path)
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    cal = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return TextSplit(cal, held)


def token_rows(docs: list[str], encode, rows: int, length: int, source: Path | str) -> list[list[int]]:
    """``rows`` rows of exactly ``length`` tokens from ``docs`` in order (the documents'
    tokens joined and cut; ``encode(str) -> list[int]`` without special tokens). A text too
    short for that is a FormatError that says how many rows it holds."""
    if rows <= 0 or length <= 0:
        raise ValueError(f"rows ({rows}) and length ({length}) must be positive")
    stream: list[int] = []
    need = rows * length
    for d in docs:
        stream.extend(encode(d + "\n\n"))
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise FormatError(
            f"{source}: {len(stream)} tokens hold {len(stream) // length} rows of {length}, "
            f"not the {rows} requested"
        )
    return [stream[i * length : (i + 1) * length] for i in range(rows)]
