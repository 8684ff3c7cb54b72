"""A chat request's ``tools`` and ``tool_choice``: checked (a 400 naming the field), and turned into
what the prompt shows, the constraint that makes the output a call ("required" or a named
function, enforced by structured output), and the reader of that constrained output."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field

from tessera.sampling import StructuredOutput

from .errors import APIError, quote
from .limits import ServerLimits
from .params import json_depth
from .tool_parsers import (
    CallDelta,
    ContentDelta,
    Delta,
    ParsedCall,
    StreamingToolParser,
    ToolOutputReader,
)
from .tool_parsers.base import call_from_json

# OpenAI's bounds: 128 tools, names of [A-Za-z0-9_-]{1,64}; the size bound is ours (the
# definitions go into every prompt and into a grammar)
MAX_TOOLS = 128
MAX_TOOLS_CHARS = 256 * 1024
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolPlan:
    choice: str  # none | auto | required | function (a named one)
    tools: list[dict] = field(default_factory=list)  # what the prompt shows: none for "none"
    constraint: StructuredOutput | None = None
    reader: ToolOutputReader | None = None  # of the constrained output; auto: the server's parser
    parallel: bool = True


def plan_tools(req, limits: ServerLimits, *, auto_enabled: bool) -> ToolPlan:
    """The tool plan of a chat request; APIError(400) naming the field that is wrong."""
    tools, choice = req.tools or [], req.tool_choice
    if not tools:
        if choice is not None:
            raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
        return ToolPlan("none")
    defs = check_tools(tools, limits)
    names = [d["function"]["name"] for d in defs]
    if choice is None:
        choice = "auto"  # OpenAI's default when tools are given
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise APIError(
                400,
                f"tool_choice is {quote(choice)}, which is not one of {', '.join(CHOICES)} or "
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
    else:
        if choice.type != "function":
            raise APIError(
                400,
                f"tool_choice.type is {quote(choice.type)}; only 'function' is supported",
                param="tool_choice",
            )
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names the function {quote(choice.function.name)}, which is not among tools "
                f"({', '.join(names)})",
                param="tool_choice",
            )
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        if not auto_enabled:
            raise APIError(
                400,
                'tool_choice "auto" (the default when tools are given) needs the server to run with '
                "--enable-auto-tool-choice (this one runs with --no-enable-auto-tool-choice); give "
                'tool_choice "required", "none" or a named function',
                param="tool_choice",
            )
        return ToolPlan("auto", defs, parallel=req.parallel_tool_calls)
    conflict = _structured_field(req)
    if conflict is not None:
        what = repr(choice) if isinstance(choice, str) else f"naming {choice.function.name!r}"
        raise APIError(
            400,
            f"tool_choice {what} makes the output a tool call, so it can't be combined with {conflict}",
            param=conflict,
        )
    if choice == "required":
        schema = _calls_schema(defs, req.parallel_tool_calls)
        return ToolPlan(
            "required",
            defs,
            StructuredOutput(json_schema=json.dumps(schema)),
            RequiredCallsReader(),
            req.parallel_tool_calls,
        )
    name = choice.function.name
    params = next(d["function"] for d in defs if d["function"]["name"] == name).get("parameters")
    return ToolPlan(
        "function",
        defs,
        StructuredOutput(json_schema=json.dumps(closed_objects(params or _NO_PARAMETERS))),
        NamedCallReader(name),
        False,
    )


def check_tools(tools, limits: ServerLimits) -> list[dict]:
    """The tools as plain dicts ({"type": "function", "function": {name, description?,
    parameters?}}), each checked."""
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"tools holds {len(tools)} tools; at most {MAX_TOOLS} are allowed", param="tools")
    defs, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise APIError(
                400,
                f"{where}.type is {quote(tool.type)}; only 'function' tools are supported",
                param=f"{where}.type",
            )
        fn = tool.function
        if not _NAME.fullmatch(fn.name):
            raise APIError(
                400,
                f"{where}.function.name {quote(fn.name)} must be 1 to 64 letters, digits, '_' or '-'",
                param=f"{where}.function.name",
            )
        if fn.name in seen:
            raise APIError(
                400,
                f"{where}.function.name {fn.name!r} is given twice; names must be unique",
                param=f"{where}.function.name",
            )
        seen.add(fn.name)
        params = fn.parameters
        if params is not None:
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise APIError(
                    400,
                    f"{where}.function.parameters must be a JSON schema object with type 'object', got "
                    f"{quote(params)}",
                    param=f"{where}.function.parameters",
                )
            if json_depth(params, limits.max_schema_depth) > limits.max_schema_depth:
                raise APIError(
                    400,
                    f"{where}.function.parameters is nested deeper than {limits.max_schema_depth} levels",
                    param=f"{where}.function.parameters",
                )
        function = {"name": fn.name}
        if fn.description is not None:
            function["description"] = fn.description
        if params is not None:
            function["parameters"] = params
        defs.append({"type": "function", "function": function})
    size = len(json.dumps(defs))
    if size > MAX_TOOLS_CHARS:
        raise APIError(
            400, f"tools take {size} characters as JSON; at most {MAX_TOOLS_CHARS} are allowed", param="tools"
        )
    return defs


def _structured_field(req) -> str | None:
    """The field asking for another structured output constraint, if any."""
    if req.response_format is not None and req.response_format.type != "text":
        return "response_format"
    return next(
        (n for n in ("guided_json", "guided_regex", "guided_choice") if getattr(req, n) is not None), None
    )


# -- "required": a JSON array of calls ----------------------------------------------------------


def _calls_schema(defs: list[dict], parallel: bool) -> dict:
    """[{"name": <a tool's name>, "arguments": <its parameters>}, ...]: one call, or several when
    parallel calls are allowed. Each tool's $defs move to the root (under names of its own), where
    its "#/$defs/..." references can find them."""
    alternatives, root_defs = [], {}
    for d in defs:
        fn = d["function"]
        params, own_defs = _hoist_defs(closed_objects(fn.get("parameters") or _NO_PARAMETERS), fn["name"])
        root_defs.update(own_defs)
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict = {"type": "array", "items": {"anyOf": alternatives}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if root_defs:
        schema["$defs"] = root_defs
    return schema


def closed_objects(schema: dict) -> dict:
    """A copy in which objects that list their properties take no others unless they say so.
    A function has no use for arguments it doesn't declare, and a small model left free to add
    them goes on adding until it runs out of tokens; what comes out still satisfies the schema."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        v = stack.pop()
        if not isinstance(v, dict):
            continue
        if isinstance(v.get("properties"), dict) and not any(k in v for k in _OPEN_KEYS):
            v["additionalProperties"] = False
        for key in _SUBSCHEMA_MAPS:  # name -> subschema
            if isinstance(v.get(key), dict):
                stack.extend(v[key].values())
        for key in _SUBSCHEMA_LISTS:
            if isinstance(v.get(key), list):
                stack.extend(v[key])
        stack.extend(v.get(key) for key in _SUBSCHEMAS)
    return schema


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
# not allOf: closing each part of an intersection apart could leave nothing that satisfies all
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def _hoist_defs(schema: dict, prefix: str) -> tuple[dict, dict]:
    local = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not local and not _refers_to_root(schema):
        return schema, {}
    schema = copy.deepcopy({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})
    renamed = {f"#/$defs/{k}": f"#/$defs/{prefix}.{k}" for k in local}
    renamed |= {f"#/definitions/{k}": f"#/$defs/{prefix}.{k}" for k in local}
    renamed["#"] = f"#/$defs/{prefix}"
    moved = {f"{prefix}.{k}": copy.deepcopy(v) for k, v in local.items()}
    moved[prefix] = schema  # the parameters themselves, for a recursive "$ref": "#"
    for value in moved.values():
        _rewrite_refs(value, renamed)
    return {"$ref": f"#/$defs/{prefix}"}, moved


def _refers_to_root(schema) -> bool:
    stack = [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if v.get("$ref") == "#":
                return True
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _rewrite_refs(schema, renamed: dict[str, str]) -> None:
    stack = [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            ref = v.get("$ref")
            if isinstance(ref, str):
                head = ref if ref == "#" else "/".join(ref.split("/", 3)[:3])  # '#/$defs/Name'
                if head in renamed:
                    v["$ref"] = renamed[head] + ref[len(head) :]
            stack.extend(x for k, x in v.items() if k != "$ref")
        elif isinstance(v, list):
            stack.extend(v)


class RequiredCallsReader(ToolOutputReader):
    """Reads ``[{"name": ..., "arguments": {...}}, ...]``; each call is said as soon as its object
    closes. An output cut before any call closed is content, as written."""

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls = [c for c in map(_element_call, _ArrayScanner().feed(text)) if c is not None]
        return (None, calls) if calls else (text, [])

    def stream(self) -> StreamingToolParser:
        return _RequiredStream()


def _element_call(element: str) -> ParsedCall | None:
    try:
        return call_from_json(json.loads(element))
    except (ValueError, RecursionError):
        return None


class _ArrayScanner:
    """Finds the objects at the top level of a JSON array as its text arrives."""

    def __init__(self) -> None:
        self.text = ""
        self.depth = 0
        self.in_string = self.escaped = False
        self.start: int | None = None

    def feed(self, text: str) -> list[str]:
        done, base = [], len(self.text)
        self.text += text
        for k, ch in enumerate(text, base):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2 and ch == "{":
                    self.start = k
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 1 and self.start is not None:
                    done.append(self.text[self.start : k + 1])
                    self.start = None
        return done


class _RequiredStream(StreamingToolParser):
    def __init__(self) -> None:
        super().__init__()
        self.scanner = _ArrayScanner()

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        for element in self.scanner.feed(text):
            call = _element_call(element)
            if call is not None:
                out += self._call(call)
        return out

    def finish(self) -> list[Delta]:
        if self.calls == 0 and self.scanner.text:
            return [ContentDelta(self.scanner.text)]
        return []


# -- a named function: the output is its arguments -----------------------------------------------


class NamedCallReader(ToolOutputReader):
    """The whole output is the arguments of one call to ``name``; they stream as they come."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        return None, [ParsedCall(self.name, text)]

    def stream(self) -> StreamingToolParser:
        return _NamedStream(self.name)


class _NamedStream(StreamingToolParser):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> list[Delta]:
        out = self._call(ParsedCall(self.name, "")) if self.calls == 0 else []
        return out + ([CallDelta(0, text)] if text else [])

    def finish(self) -> list[Delta]:
        return self._call(ParsedCall(self.name, "")) if self.calls == 0 else []
