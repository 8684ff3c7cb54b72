"""How one request wants its tokens chosen and when it stops. Plain data, no torch."""

from __future__ import annotations

import math

import msgspec

GREEDY_EPSILON = 1e-5


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def bad(field: str, value, rule: str) -> ValueError:
            return ValueError(f"{field} must be {rule}, got {value!r}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", self.temperature, "a finite number >= 0")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", self.top_p, "in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", self.top_k, "-1, 0 (disabled) or a positive number of tokens")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", self.min_p, "in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"at most max_tokens ({self.max_tokens})")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise bad("seed", self.seed, "a 64-bit integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON
