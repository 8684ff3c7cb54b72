"""Tools and tool calls into the chat template.

A template with a tool section (it names ``tools`` / ``tool_calls``, as Qwen2.5's and Llama 3.1's
do) gets them as transformers gives them: ``tools=[...]``, assistant messages with ``tool_calls``
whose arguments are decoded objects, ``tool`` messages with their ``tool_call_id`` (and the called
function's ``name``). A template without one (SmolLM2's) gets plain text in the tool parser's
format: the tools in the system message, earlier calls written as the model would write them,
and results as a user message of ``<tool_response>`` blocks (Qwen2.5's way; a template that
alternates user and assistant still renders it)."""

from __future__ import annotations

import json

from .errors import APIError, quote
from .tool_parsers import ParsedCall, ToolParser
from .tool_parsers.base import dump_arguments


def template_inputs(
    messages: list[dict], tools: list[dict], parser: ToolParser, native: bool
) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for ``messages`` as ServingChat.plain_messages gives
    them (tool_calls as the request's structs) and the tools the prompt shows."""
    calls = {i: _calls(m["tool_calls"], i) for i, m in enumerate(messages) if m.get("tool_calls")}
    if native:
        return _native(messages, calls), ({"tools": tools} if tools else {})
    return _as_text(messages, calls, tools, parser), {}


def _calls(tool_calls, i: int) -> list[tuple[str | None, ParsedCall]]:
    out = []
    for j, call in enumerate(tool_calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if call.type != "function":
            raise APIError(
                400, f"{where}.type is {quote(call.type)}; only 'function' calls are supported", param=where
            )
        args = call.function.arguments
        if isinstance(args, str):
            try:
                decoded = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                decoded = None
            # arguments that aren't a JSON object are kept as a JSON string
            args = dump_arguments(decoded) if isinstance(decoded, dict) else json.dumps(args)
        else:
            args = dump_arguments(args)
        out.append((call.id, ParsedCall(call.function.name, args)))
    return out


def _native(messages: list[dict], calls: dict) -> list[dict]:
    names = {}  # tool_call_id -> the function it called
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in m.items() if k != "tool_calls"}
        if i in calls:
            m["tool_calls"] = [
                {
                    "id": cid,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.loads(c.arguments)},
                }
                for cid, c in calls[i]
            ]
            names.update((cid, c.name) for cid, c in calls[i] if cid is not None)
        if m["role"] == "tool" and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
        out.append(m)
    return out


def _as_text(messages: list[dict], calls: dict, tools: list[dict], parser: ToolParser) -> list[dict]:
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):  # results of one turn's calls: one message
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        content = m["content"]
        if i in calls:
            written = parser.render_calls([c for _, c in calls[i]])
            content = f"{content}\n{written}" if content else written
        out.append({"role": m["role"], "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = parser.system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
