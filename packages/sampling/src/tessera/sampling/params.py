"""How one request wants its tokens chosen and when it stops. Plain data, no torch."""

from __future__ import annotations

import math

import msgspec

from .structured_output import StructuredOutput

GREEDY_EPSILON = 1e-5


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    n: int = 1  # completions per prompt (the engine runs n requests)
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
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has appeared in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this per appearance in the output
    repetition_penalty: float = 1.0  # HF's: divides positive / multiplies negative logits of seen tokens
    logit_bias: dict[int, float] = {}
    allowed_token_ids: list[int] | None = None
    banned_token_ids: list[int] = []
    logprobs: int | None = None  # return the sampled token's logprob and this many top ones
    prompt_logprobs: int | None = None  # logprobs of each prompt token (and this many top ones)
    structured: StructuredOutput | None = None  # constrain the output to a grammar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def bad(field: str, value, rule: str) -> ValueError:
            return ValueError(f"{field} must be {rule}, got {value!r}")

        if self.n < 1:
            raise bad("n", self.n, "at least 1")
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
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise bad(name, v, "in [-2, 2]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", self.repetition_penalty, "a finite number > 0")
        for tok, bias in self.logit_bias.items():
            if tok < 0 or not (-100.0 <= bias <= 100.0):
                raise bad("logit_bias", {tok: bias}, "token ids >= 0 mapped to values in [-100, 100]")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(t < 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", self.allowed_token_ids, "a non-empty list of token ids >= 0")
        if any(t < 0 for t in self.banned_token_ids):
            raise bad("banned_token_ids", self.banned_token_ids, "a list of token ids >= 0")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise bad("logprobs", self.logprobs, "between 0 and 20")
        if self.prompt_logprobs is not None and not (0 <= self.prompt_logprobs <= 20):
            raise bad("prompt_logprobs", self.prompt_logprobs, "between 0 and 20")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id named here is outside a vocabulary of ``vocab_size``."""
        named = [
            *self.stop_token_ids,
            *self.logit_bias,
            *(self.allowed_token_ids or ()),
            *self.banned_token_ids,
        ]
        bad = [t for t in named if t >= vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON
