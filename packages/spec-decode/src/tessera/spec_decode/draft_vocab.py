"""The tokens a draft model may propose when its LM head keeps only part of the vocabulary
(``speculative_config.draft_vocab_size``): the most frequent ones in a corpus, and the special
tokens. A draft scores every token per drafted position; a large vocabulary makes that head a
third of a small draft's bytes (Qwen2.5-0.5B: 145 of 392 MB streamed per token), while a few
tens of thousands of tokens make most of any text. The output distribution does not change:
the target verifies every draft, and a token the draft cannot propose is simply not drafted.

The default corpus is the Python standard library's source (present wherever Python is: code,
and English prose in its docstrings and comments); ``draft_vocab_corpus`` names other text."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_CORPUS_BYTES = 8 << 20  # of the standard library: ~2 s of tokenizing on 2 cores
MAX_CORPUS_BYTES = 64 << 20  # of a corpus given by path
_CHUNK = 1 << 16  # characters per text handed to the tokenizer


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[str]:
    """The standard library's ``.py`` files (top level and one folder down, by name) up to
    ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
    return _read(files, max_bytes)


def read_corpus(path: str | Path, max_bytes: int = MAX_CORPUS_BYTES) -> list[str]:
    """The text of a file, or of the files under a folder (by name, recursively), up to
    ``max_bytes``; bytes that are not UTF-8 are replaced. ValueError where there is none."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        raise ValueError(f"speculative_config.draft_vocab_corpus {str(path)!r} is not a file or folder")
    texts = _read(files, max_bytes)
    if not any(t.strip() for t in texts):
        raise ValueError(f"speculative_config.draft_vocab_corpus {str(path)!r} holds no text")
    return texts


def _read(files: Iterable[Path], max_bytes: int) -> list[str]:
    texts, left = [], max_bytes
    for f in files:
        if left <= 0:
            break
        try:
            with open(f, "rb") as fh:
                data = fh.read(left)
        except OSError:
            continue
        left -= len(data)
        text = data.decode("utf-8", errors="replace")
        texts.extend(text[i : i + _CHUNK] for i in range(0, len(text), _CHUNK))
    return texts


def frequent_tokens(
    encode: Callable[[list[str]], Sequence[Sequence[int]]],
    vocab_size: int,
    size: int,
    texts: list[str],
    keep: Iterable[int] = (),
    multiple: int = 16,
) -> list[int]:
    """Sorted token ids: the ``size`` most frequent in ``texts`` under ``encode`` (a batch of
    texts to their ids; ties, and tokens the corpus never uses, by lower id: BPE's earlier
    merges), every id of ``keep`` (end-of-sequence and other special tokens), and the next most
    frequent up to a multiple of ``multiple`` ids (the packed CPU kernels take 16 rows at a time:
    an LM head of another row count would run dequantized)."""
    if size < 1:
        raise ValueError(f"draft_vocab_size must be at least 1, got {size}")
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in encode(texts):
        if len(ids):
            t = torch.as_tensor(list(ids), dtype=torch.int64)
            counts += torch.bincount(t[(t >= 0) & (t < vocab_size)], minlength=vocab_size)
    # a stable sort of -count: equal counts stay in id order
    order = torch.sort(-counts, stable=True).indices.tolist()
    chosen = set(order[: min(size, vocab_size)])
    chosen.update(int(i) for i in keep if 0 <= int(i) < vocab_size)
    rest = (t for t in order[min(size, vocab_size) :] if t not in chosen)
    while len(chosen) % multiple and len(chosen) < vocab_size:
        chosen.add(next(rest))
    return sorted(chosen)


def cached_frequent_tokens(
    encode: Callable[[list[str]], Sequence[Sequence[int]]],
    vocab_size: int,
    size: int,
    texts: list[str],
    keep: Iterable[int] = (),
    *,
    tokenizer_key: str,
    cache_dir: Path | None,
    multiple: int = 16,
) -> list[int]:
    """``frequent_tokens``, kept on disk under ``cache_dir`` (none: not kept): tokenizing the
    corpus is most of a lean draft's extra start-up (~2.5 s for the standard library on 2 cores,
    in every process that loads the draft). The file's name is a hash of everything the ranking
    depends on: ``tokenizer_key`` (a string naming the tokenizer's every token and rule, e.g. its
    JSON), the texts, the vocabulary size, ``size``, ``keep`` and ``multiple``. A file that cannot
    be read or does not hold such a ranking is ignored and rewritten."""
    keep = sorted({int(i) for i in keep})
    h = hashlib.sha256()
    h.update(json.dumps([vocab_size, size, keep, multiple]).encode())
    h.update(hashlib.sha256(tokenizer_key.encode()).digest())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8", errors="replace")).digest())
    path = None if cache_dir is None else Path(cache_dir) / f"draft-vocab-{h.hexdigest()[:24]}.json"
    if path is not None and path.is_file():
        try:
            ids = json.loads(path.read_text())
            if (
                isinstance(ids, list)
                and all(type(i) is int and 0 <= i < vocab_size for i in ids)
                and ids == sorted(set(ids))
                and set(keep) <= set(ids)
            ):
                return ids
        except (OSError, ValueError):
            pass
        log.warning("draft vocabulary cache %s unreadable; ranking the corpus again", path)
    ids = frequent_tokens(encode, vocab_size, size, texts, keep, multiple)
    if path is not None:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(ids, f)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache only costs the ranking next time
            log.warning("could not keep the draft vocabulary in %s: %s", path.parent, e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return ids
