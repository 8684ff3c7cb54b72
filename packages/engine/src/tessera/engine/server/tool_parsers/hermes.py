"""Hermes / Qwen2.5 calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
blocks, any number, with text around them. A block may hold a list of calls too
(SmolLM2 writes ``<tool_call>[{...}, {...}]</tool_call>``).

Content is the text outside the blocks, less the whitespace that touches a block; a block whose
inside is not a call (malformed JSON, no name) stays in the content as written. A block left
open at the end of the output (cut by max_tokens, even inside its closing tag) is a call if what
follows the tag is one."""

from __future__ import annotations

import json

from .base import (
    ContentDelta,
    Delta,
    ParsedCall,
    StreamingToolParser,
    ToolParser,
    call_json,
    calls_from_json,
)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        items: list[str | list[ParsedCall]] = []  # text, or the calls of one block
        pos = 0
        while (i := text.find(START, pos)) >= 0:
            items.append(text[pos:i])
            j = text.find(END, i + len(START))
            end = len(text) if j < 0 else j + len(END)
            calls = calls_from_json(
                text[i + len(START) : j] if j >= 0 else _open_body(text[i + len(START) :])
            )
            items.append(text[i:end] if calls is None else calls)
            pos = end
        items.append(text[pos:])
        # join neighbouring text (a malformed block is text) before trimming at the blocks
        merged: list[str | list[ParsedCall]] = []
        for item in items:
            if isinstance(item, str) and merged and isinstance(merged[-1], str):
                merged[-1] += item
            else:
                merged.append(item)
        content, calls = [], []
        for k, item in enumerate(merged):
            if isinstance(item, list):
                calls += item
                continue
            if k > 0:
                item = item.lstrip()
            if k < len(merged) - 1:
                item = item.rstrip()
            content.append(item)
        joined = "".join(content)
        return (None if calls and not joined else joined), calls

    def stream(self) -> StreamingToolParser:
        return _HermesStream()

    def system_prompt(self, tools: list[dict]) -> str:
        # Qwen2.5's own words (its chat template's tool section)
        listing = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{listing}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_calls(self, calls: list[ParsedCall]) -> str:
        return "\n".join(f"{START}\n{call_json(c, 'arguments')}\n{END}" for c in calls)


def _open_body(body: str) -> str:
    """The inside of a block left open at the end, less a closing tag cut short."""
    cut = next((k for k in range(min(len(END) - 1, len(body)), 0, -1) if END.startswith(body[-k:])), 0)
    return body[: len(body) - cut]


def _held(text: str) -> int:
    """How many characters at the end of ``text`` to hold back: a possible start of the open tag,
    and the whitespace before it (dropped if a call block follows)."""
    keep = next((k for k in range(min(len(START) - 1, len(text)), 0, -1) if START.startswith(text[-k:])), 0)
    body = text[: len(text) - keep]
    return keep + len(body) - len(body.rstrip())


class _HermesStream(StreamingToolParser):
    def __init__(self) -> None:
        super().__init__()
        self.buf = ""  # text not yet said
        self.in_block = False  # buf is the inside of an open block
        self.ws_before = ""  # whitespace before the open block: dropped if it is a call
        self.after_call = False  # whitespace right after a call block is dropped

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        out: list[Delta] = []
        while True:
            if self.in_block:
                j = self.buf.find(END)
                if j < 0:
                    return out
                body, self.buf = self.buf[:j], self.buf[j + len(END) :]
                self.in_block = False
                self._close(body, START + body + END, out)
                continue
            if self.after_call:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return out
                self.after_call = False
            i = self.buf.find(START)
            if i < 0:
                say = self.buf[: len(self.buf) - _held(self.buf)]
                self.buf = self.buf[len(say) :]
                _content(out, say)
                return out
            before = self.buf[:i]
            _content(out, before.rstrip())
            self.ws_before = before[len(before.rstrip()) :]
            self.buf = self.buf[i + len(START) :]
            self.in_block = True

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        if self.in_block:
            self.in_block = False
            body, self.buf = self.buf, ""
            self._close(_open_body(body), START + body, out)
        elif self.after_call:
            _content(out, self.buf.lstrip())
        else:
            _content(out, self.buf)
        self.buf = ""
        return out

    def _close(self, body: str, written: str, out: list[Delta]) -> None:
        calls = calls_from_json(body)
        if calls is None:
            _content(out, self.ws_before + written)
        else:
            for call in calls:
                out += self._call(call)
            self.after_call = True
        self.ws_before = ""


def _content(out: list[Delta], text: str) -> None:
    if text:
        out.append(ContentDelta(text))
