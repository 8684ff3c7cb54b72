"""A choice's output read for tool calls, as OpenAI answers them: a message with ``tool_calls``
(content null when there is nothing else), or stream deltas in which a call's first delta
carries its id, type and name, and later ones fragments of its arguments."""

from __future__ import annotations

import uuid

from .protocol import (
    AssistantMessage,
    ChatDelta,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
)
from .tool_parsers import CallDelta, ContentDelta, Delta, ToolOutputReader


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(engine_reason: str | None, has_calls: bool) -> str | None:
    # a call cut by max_tokens is still "length", as OpenAI says it
    return "tool_calls" if has_calls and engine_reason != "length" else engine_reason


def tool_message(
    text: str, engine_reason: str | None, reader: ToolOutputReader, parallel: bool
) -> tuple[AssistantMessage, str | None]:
    """The assistant message of a whole output, and its finish reason."""
    content, calls = reader.parse(text)
    calls = calls if parallel else calls[:1]
    if not calls:
        return AssistantMessage(content=content if content is not None else ""), engine_reason
    tool_calls = [
        ToolCallOut(id=call_id(), function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls
    ]
    return AssistantMessage(content=content, tool_calls=tool_calls), finish_reason(engine_reason, True)


class ToolCallStream:
    """One choice's text deltas in, chat deltas out."""

    def __init__(self, reader: ToolOutputReader, parallel: bool) -> None:
        self.parser = reader.stream()
        self.parallel = parallel
        self.ids: dict[int, str] = {}

    @property
    def has_calls(self) -> bool:
        return bool(self.ids)

    def deltas(self, text: str, finished: bool) -> list[ChatDelta]:
        events = self.parser.feed(text) if text else []
        if finished:
            events += self.parser.finish()
        return self._chat_deltas(events)

    def _chat_deltas(self, events: list[Delta]) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        for e in events:
            if isinstance(e, ContentDelta):
                if out and out[-1].tool_calls is None:
                    out[-1].content += e.text
                else:
                    out.append(ChatDelta(content=e.text))
                continue
            assert isinstance(e, CallDelta)
            if e.index > 0 and not self.parallel:
                continue
            if e.name is not None:
                self.ids[e.index] = call_id()
                call = ToolCallDelta(
                    index=e.index,
                    id=self.ids[e.index],
                    type="function",
                    function=FunctionCallDelta(name=e.name, arguments=e.arguments),
                )
            else:
                call = ToolCallDelta(index=e.index, function=FunctionCallDelta(arguments=e.arguments))
            out.append(ChatDelta(tool_calls=[call]))
        return out
