"""What a tool-call parser does: read a model's whole output into content and calls, or read it
as it streams into content deltas and call deltas (the same result, however the text is cut)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallDelta:
    """The first delta of call ``index`` has its ``name`` (and arguments ""); later ones only
    add to its arguments."""

    index: int
    arguments: str
    name: str | None = None


Delta = ContentDelta | CallDelta


class StreamingToolParser(ABC):
    """Fed the output's text deltas; returns what can be said for sure so far."""

    def __init__(self) -> None:
        self.calls = 0  # calls started so far

    @abstractmethod
    def feed(self, text: str) -> list[Delta]: ...

    @abstractmethod
    def finish(self) -> list[Delta]:
        """The output ended: whatever was held back."""

    def _call(self, call: ParsedCall) -> list[Delta]:
        self.calls += 1
        head = CallDelta(self.calls - 1, "", call.name)
        return [head, CallDelta(self.calls - 1, call.arguments)] if call.arguments else [head]


class ToolOutputReader(ABC):
    @abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole output; content is None when there are calls and no
        other text."""

    @abstractmethod
    def stream(self) -> StreamingToolParser: ...


class ToolParser(ToolOutputReader):
    """One model family's tool-call format, both ways: reading calls out of the model's output,
    and (for chat templates that know nothing of tools) telling the model the tools and writing
    its earlier calls back into the conversation."""

    name: str

    @abstractmethod
    def system_prompt(self, tools: list[dict]) -> str:
        """The tools and how to call them, for a system message."""

    @abstractmethod
    def render_calls(self, calls: list[ParsedCall]) -> str:
        """An assistant's earlier calls as the model would have written them."""


def call_from_json(value) -> ParsedCall | None:
    """A call from a decoded ``{"name": ..., "arguments" | "parameters": {...}}``; None if it
    isn't one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(value["name"], dump_arguments(args))


def call_json(call: ParsedCall, arguments_key: str) -> str:
    """``{"name": ..., "<arguments_key>": {...}}``: a call as a model writes it."""
    return f'{{"name": {json.dumps(call.name, ensure_ascii=False)}, "{arguments_key}": {call.arguments}}}'


def dump_arguments(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False)


def calls_from_json(text: str) -> list[ParsedCall] | None:
    """The calls in a JSON object or a list of them; None if ``text`` is not that."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    calls = [call_from_json(v) for v in (value if isinstance(value, list) else [value])]
    return None if any(c is None for c in calls) else calls
