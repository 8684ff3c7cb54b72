"""tools / tool_choice without a model: the plan a request gets, the schema that forces calls, and
how calls and results go into a chat template (one with a tool section, one without)."""

import json

import msgspec
import pytest

from tessera.engine.server.errors import APIError
from tessera.engine.server.limits import ServerLimits
from tessera.engine.server.protocol import ChatCompletionRequest
from tessera.engine.server.tool_choice import closed_objects, plan_tools
from tessera.engine.server.tool_parsers import tool_parser
from tessera.engine.server.tool_prompt import template_inputs
from tessera.formats import render_chat_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def request(**body) -> ChatCompletionRequest:
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


def plan(auto_enabled=True, **body):
    return plan_tools(request(**body), ServerLimits(), auto_enabled=auto_enabled)


def test_tools_default_to_auto_and_none_shows_no_tools():
    assert plan().choice == "none"
    auto = plan(tools=[WEATHER])
    assert auto.choice == "auto" and auto.tools == [WEATHER] and auto.constraint is None
    none = plan(tools=[WEATHER], tool_choice="none")
    assert none.choice == "none" and none.tools == []


def test_auto_refused_when_the_server_disables_it_naming_the_option():
    with pytest.raises(APIError) as e:
        plan(auto_enabled=False, tools=[WEATHER])
    assert e.value.status == 400 and e.value.param == "tool_choice"
    assert "--enable-auto-tool-choice" in e.value.message
    assert plan(auto_enabled=False, tools=[WEATHER], tool_choice="required").choice == "required"


def test_required_schema_takes_each_tools_calls_and_resolves_their_refs():
    jsonschema = pytest.importorskip("jsonschema")
    # what pydantic writes for a model with a nested model: a $ref into its own $defs
    order = {
        "type": "object",
        "properties": {"item": {"$ref": "#/$defs/Item"}, "count": {"type": "integer"}},
        "required": ["item", "count"],
        "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}},
    }
    tools = [WEATHER, {"type": "function", "function": {"name": "order", "parameters": order}}]
    p = plan(tools=tools, tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(p.constraint.json_schema)
    ok = [{"name": "order", "arguments": {"item": {"sku": "A1"}, "count": 2}}]
    jsonschema.validate(ok, schema)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}], schema)
    for bad in (
        [{"name": "order", "arguments": {"item": {"sku": 5}, "count": 2}}],  # the nested ref holds
        [{"name": "get_weather", "arguments": {"city": "Oslo", "extra": 1}}],  # closed
        [{"name": "nope", "arguments": {}}],
        [],
        ok + ok,  # parallel_tool_calls false: one call
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_a_named_function_is_constrained_to_its_parameters():
    p = plan(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert p.choice == "function"
    assert json.loads(p.constraint.json_schema) == closed_objects(WEATHER["function"]["parameters"])
    assert p.reader.parse('{"city":"Oslo"}')[1][0].name == "get_weather"


def test_closed_objects_leaves_declared_openness_and_property_names_alone():
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {}}, "free": {"type": "object"}},
        "$defs": {"Open": {"type": "object", "properties": {}, "additionalProperties": True}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]  # no properties listed
    assert closed["$defs"]["Open"]["additionalProperties"] is True
    assert "additionalProperties" not in schema  # a copy


# -- into the chat template ----------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    {"role": "tool", "tool_call_id": "c2", "content": "sun"},
]


def plain(messages):
    """As ServingChat.plain_messages hands them on."""
    req = request(messages=messages)
    out = []
    for m in req.messages:
        entry = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            entry["tool_calls"] = m.tool_calls
        if m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# the conventions of Qwen2.5's tool section, in a few lines
WITH_TOOLS = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% if c.function is defined %}{% set c = c.function %}{% endif %}"
    "[{{ c.name }} {{ c.arguments | tojson }}]{% endfor %}"
    "{% if m.role == 'tool' %}({{ m.name }}){% endif %}\n{% endfor %}"
)


def test_a_template_without_a_tool_section_gets_hermes_text():
    hermes = tool_parser("hermes")
    messages, extra = template_inputs(plain(HISTORY), [WEATHER], hermes, native=False)
    assert extra == {}
    text = render_chat_template(CHATML, messages)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER) in text
    assert (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\nsun\n</tool_response><|im_end|>"
    ) in text
    # the calls the model is shown are the ones hermes reads back
    block = text[
        text.index("<|im_start|>assistant\n") + 22 : text.index("<|im_end|>\n<|im_start|>user\n<tool_")
    ]
    assert [c.name for c in hermes.parse(block)[1]] == ["get_weather", "get_weather"]


def test_no_tools_no_system_message_added():
    messages, _ = template_inputs(plain(HISTORY[1:]), [], tool_parser("hermes"), native=False)
    assert messages[0] == {"role": "user", "content": "Weather in Oslo and Rome?"}


def test_a_template_with_a_tool_section_gets_tools_and_decoded_arguments():
    messages, extra = template_inputs(plain(HISTORY), [WEATHER], tool_parser("hermes"), native=True)
    text = render_chat_template(WITH_TOOLS, messages, **extra)
    assert text.startswith("TOOLS:" + json.dumps(WEATHER))
    assert 'assistant:[get_weather {"city": "Oslo"}][get_weather {"city": "Rome"}]' in text
    assert "tool:rain(get_weather)" in text


def test_a_bad_call_in_the_history_is_a_400_naming_it():
    bad = json.loads(json.dumps(HISTORY))
    bad[2]["tool_calls"][1]["type"] = "code"
    with pytest.raises(APIError) as e:
        template_inputs(plain(bad), [], tool_parser("hermes"), native=False)
    assert e.value.param == "messages[2].tool_calls[1]"


def test_serve_takes_the_tool_options():
    from tessera.engine.cli import build_parser

    ns = build_parser().parse_args(["serve"])
    assert ns.tool_call_parser == "auto" and ns.enable_auto_tool_choice is True
    ns = build_parser().parse_args(
        ["serve", "--tool-call-parser", "llama3_json", "--no-enable-auto-tool-choice"]
    )
    assert ns.tool_call_parser == "llama3_json" and ns.enable_auto_tool_choice is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "nope"])
