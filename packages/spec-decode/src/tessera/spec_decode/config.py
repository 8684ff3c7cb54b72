"""``--speculative-config``: which proposer, how many tokens, and whether k adapts; named as
vLLM names them, checked at start before any weight is loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
# a draft's weights re-quantized at load (tessera.formats.gguf_quantize's schemes)
DRAFT_QUANTIZATIONS = ("q4_0", "q4_1", "q8_0")
MIN_DRAFT_VOCAB = 256


class SpeculativeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up
    prompt_lookup_min: int = 2  # ngram: the shortest suffix that counts as a match
    adaptive: bool = True  # k chosen per request and step from its acceptance and the batch
    # no speculation in a step whose running batch has more requests than this (vLLM's name)
    disable_by_batch_size: int | None = None
    model: str | None = None  # draft_model: the draft's checkpoint
    # draft_model: its linear weights and LM head re-quantized at load to this GGUF scheme (the
    # packed CPU path): fewer bytes per drafted token; the output is unchanged (verified)
    quantization: str | None = None
    # draft_model: its LM head keeps the N tokens most frequent in draft_vocab_corpus (the
    # Python standard library's source by default) and the special tokens: it proposes no other
    draft_vocab_size: int | None = None
    draft_vocab_corpus: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first invalid field."""
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config.method must be one of {', '.join(map(repr, METHODS))}, "
                f"got {self.method!r}"
            )
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model):
            raise ValueError(
                'speculative_config.model is required for method "draft_model": the draft\'s checkpoint '
                "(a path, or a short name such as qwen2.5-coder-0.5b-instruct)"
            )
        k = self.num_speculative_tokens
        if not (isinstance(k, int) and 1 <= k <= MAX_SPECULATIVE_TOKENS):
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be an integer in "
                f"1..{MAX_SPECULATIVE_TOKENS}, got {k!r}"
            )
        if self.prompt_lookup_min < 1:
            raise ValueError(
                f"speculative_config.prompt_lookup_min must be at least 1, got {self.prompt_lookup_min}"
            )
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(
                f"speculative_config.prompt_lookup_max ({self.prompt_lookup_max}) must be at least "
                f"prompt_lookup_min ({self.prompt_lookup_min})"
            )
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(
                "speculative_config.disable_by_batch_size must be at least 1 (or absent), "
                f"got {self.disable_by_batch_size}"
            )
        for name in ("model", "quantization", "draft_vocab_size", "draft_vocab_corpus"):
            if getattr(self, name) is not None and self.method != "draft_model":
                raise ValueError(
                    f'speculative_config.{name} is for method "draft_model", not {self.method!r}'
                )
        if self.quantization is not None and self.quantization.lower() not in DRAFT_QUANTIZATIONS:
            raise ValueError(
                f"speculative_config.quantization must be one of {', '.join(map(repr, DRAFT_QUANTIZATIONS))} "
                f"(the draft's weights re-quantized at load), got {self.quantization!r}"
            )
        if self.draft_vocab_size is not None and self.draft_vocab_size < MIN_DRAFT_VOCAB:
            raise ValueError(
                f"speculative_config.draft_vocab_size must be at least {MIN_DRAFT_VOCAB} (or absent: "
                f"the whole vocabulary), got {self.draft_vocab_size}"
            )
        if self.draft_vocab_corpus is not None:
            if self.draft_vocab_size is None:
                raise ValueError("speculative_config.draft_vocab_corpus needs draft_vocab_size")
            if not os.path.exists(self.draft_vocab_corpus):
                raise ValueError(
                    f"speculative_config.draft_vocab_corpus {self.draft_vocab_corpus!r} does not exist"
                )
            if not _holds_bytes(Path(self.draft_vocab_corpus)):
                raise ValueError(
                    f"speculative_config.draft_vocab_corpus {self.draft_vocab_corpus!r} holds no text "
                    "(an empty file, or a folder without a non-empty file)"
                )

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From JSON text (the command line), a dict (``LLM(speculative_config=...)``) or a config;
        None stays None (no speculation)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON ({e}): {value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(
                f"speculative_config must be a JSON object such as "
                f'{{"method": "ngram", "num_speculative_tokens": 4}}, got {value!r}'
            )
        try:
            return msgspec.convert(value, cls)
        except msgspec.ValidationError as e:
            raise ValueError(_field_message(e)) from None


def _field_message(e: msgspec.ValidationError) -> str:
    """msgspec says ``... - at `$.field` ``; name the field first. (A ValueError of validate()
    comes wrapped, already naming its field.)"""
    text = str(e)
    if text.startswith("speculative_config."):
        return text
    if " - at `$." in text:
        what, where = text.rsplit(" - at `$.", 1)
        return f"speculative_config.{where.rstrip('`')}: {what}"
    return f"speculative_config: {text}"


def _holds_bytes(path: Path) -> bool:
    """A non-empty file, or a folder with one somewhere under it (the first found ends the walk)."""
    try:
        if path.is_file():
            return path.stat().st_size > 0
        return any(f.is_file() and f.stat().st_size > 0 for f in path.rglob("*"))
    except OSError:
        return False
