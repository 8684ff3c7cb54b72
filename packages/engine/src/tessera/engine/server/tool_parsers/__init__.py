"""Tool-call parsers by name (vLLM's names), and the choice of one for a chat template."""

from __future__ import annotations

import re

from .base import (
    CallDelta,
    ContentDelta,
    Delta,
    ParsedCall,
    StreamingToolParser,
    ToolOutputReader,
    ToolParser,
)
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    HermesToolParser.name: HermesToolParser,
    Llama3JsonToolParser.name: Llama3JsonToolParser,
}

_TOOL_SECTION = re.compile(r"\b(tools|tool_calls)\b")


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders tools and tool calls itself (Qwen2.5's, Llama 3.1's do)."""
    return bool(template and _TOOL_SECTION.search(template))


def tool_parser(name: str, template: str | None = None) -> ToolParser:
    """The parser called ``name``; "auto" picks from the template: hermes for one that writes
    ``<tool_call>`` (Qwen2.5's), llama3_json for Llama 3's tool section, and hermes for a template
    with no tool section, since the server then puts hermes instructions in the prompt."""
    if name == "auto":
        is_llama3 = (
            template_knows_tools(template) and "<tool_call>" not in template and "<|eot_id|>" in template
        )
        name = Llama3JsonToolParser.name if is_llama3 else HermesToolParser.name
    if name not in TOOL_PARSERS:
        raise ValueError(
            f"tool call parser {name!r} is not known (known: auto, {', '.join(sorted(TOOL_PARSERS))})"
        )
    return TOOL_PARSERS[name]()


__all__ = [
    "TOOL_PARSERS",
    "CallDelta",
    "ContentDelta",
    "Delta",
    "ParsedCall",
    "StreamingToolParser",
    "ToolOutputReader",
    "ToolParser",
    "template_knows_tools",
    "tool_parser",
]
