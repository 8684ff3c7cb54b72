"""Llama 3.1 / 3.2 calls: the whole output is ``{"name": ..., "parameters": {...}}`` (or
"arguments"), optionally after ``<|python_tag|>``, several separated by ``;``. An output that
is not entirely calls is content, untouched: these models put no text beside their calls."""

from __future__ import annotations

import json

from .base import (
    ContentDelta,
    Delta,
    ParsedCall,
    StreamingToolParser,
    ToolParser,
    call_from_json,
    call_json,
)

PYTHON_TAG = "<|python_tag|>"
_decoder = json.JSONDecoder()


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls = _calls(text)
        return (text, []) if calls is None else (None, calls)

    def stream(self) -> StreamingToolParser:
        return _Llama3Stream(self)

    def system_prompt(self, tools: list[dict]) -> str:
        # the words of Llama 3.1's template for JSON tool calling
        listing = "\n\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call with its "
            "proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name '
            f"and its value}}. Do not use variables.\n\n{listing}"
        )

    def render_calls(self, calls: list[ParsedCall]) -> str:
        return "; ".join(call_json(c, "parameters") for c in calls)


def _calls(text: str) -> list[ParsedCall] | None:
    """The calls if ``text`` is nothing but calls, else None."""
    pos = len(text) - len(text.lstrip())
    if text.startswith(PYTHON_TAG, pos):
        pos += len(PYTHON_TAG)
    calls: list[ParsedCall] = []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        try:
            value, pos = _decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        found = [call_from_json(v) for v in (value if isinstance(value, list) else [value])]
        if not found or any(c is None for c in found):
            return None
        calls += found
        rest = text[pos:].lstrip()
        if not rest:
            return calls
        if rest[0] != ";":
            return None
        pos = len(text) - len(rest) + 1


class _Llama3Stream(StreamingToolParser):
    """Text that can't start a call streams as content at once; text that may be calls is held
    to the end, since one stray character after them makes it all content."""

    def __init__(self, parser: Llama3JsonToolParser) -> None:
        super().__init__()
        self.parser = parser
        self.buf = ""
        self.mode = "undecided"  # then "content" or "held"

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        if self.mode == "undecided":
            head = self.buf.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return []
            self.mode = "held" if head[0] in "{[" or head.startswith(PYTHON_TAG) else "content"
        if self.mode == "content" and self.buf:
            out, self.buf = [ContentDelta(self.buf)], ""
            return out
        return []

    def finish(self) -> list[Delta]:
        text, self.buf = self.buf, ""
        if self.mode == "content" or not text:
            return [ContentDelta(text)] if text else []
        content, calls = self.parser.parse(text)
        if not calls:
            return [ContentDelta(content)] if content else []
        out: list[Delta] = []
        for call in calls:
            out += self._call(call)
        return out
