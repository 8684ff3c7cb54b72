"""``--speculative-config``: which proposer, how many tokens, and whether k adapts; named as
vLLM names them, checked at start before any weight is loaded."""

from __future__ import annotations

import json

import msgspec

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


class SpeculativeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up
    prompt_lookup_min: int = 2  # ngram: the shortest suffix that counts as a match
    adaptive: bool = True  # k chosen per request and step from its acceptance and the batch
    # no speculation in a step whose running batch has more requests than this (vLLM's name)
    disable_by_batch_size: int | None = None
    model: str | None = None  # draft_model: the draft's checkpoint

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
        if self.model is not None and self.method != "draft_model":
            raise ValueError(f'speculative_config.model is for method "draft_model", not {self.method!r}')

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
