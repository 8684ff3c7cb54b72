"""Structured output: a grammar (JSON schema, regex, choice list, Lark) that constrains which
tokens may come next, enforced by llguidance's token masks in the batched sampler."""

from __future__ import annotations

import json
import re

import msgspec


class StructuredOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Exactly one of the fields."""

    json_schema: str | None = None  # the schema as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark syntax, as llguidance reads it

    def grammar_spec(self) -> str:
        """The llguidance grammar for this constraint; ValueError if malformed."""
        from llguidance import LLMatcher

        given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                f"structured output must set exactly one of json_schema, json_object, regex, choice, "
                f"grammar (got {', '.join(given) or 'none'})"
            )
        # compact whitespace, as OpenAI's structured outputs: free whitespace lets a small model
        # wander in indentation until it runs out of tokens
        opts = {"whitespace_flexible": False}
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=opts)
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from e
            return LLMatcher.grammar_from_json_schema(schema, defaults=opts)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            if not self.choice:
                raise ValueError("choice must list at least one string")
            return LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)


class GrammarCompiler:
    """Turns StructuredOutputs into llguidance matchers for one tokenizer (built once, ~0.2 s)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        from llguidance import LLTokenizer

        self.vocab_size = vocab_size
        eos = list(eos_token_ids)
        self.tokenizer = LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=eos[0] if len(eos) == 1 else eos
        )

    def validate(self, spec: StructuredOutput) -> str:
        """The grammar text; ValueError naming what is wrong with the constraint."""
        from llguidance import LLMatcher

        grammar = spec.grammar_spec()
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"the structured output grammar is invalid: {error.strip()}")
        return grammar

    def matcher(self, spec: StructuredOutput):
        from llguidance import LLMatcher

        m = LLMatcher(self.tokenizer, self.validate(spec))
        if m.is_error():
            raise ValueError(f"the structured output grammar is invalid: {m.get_error()}")
        return m
