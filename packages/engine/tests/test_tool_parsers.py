"""Tool-call parsers on the exact outputs of the models they are for, and streaming (fed in any
pieces) giving what the whole-output parse gives."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.engine.server.tool_choice import NamedCallReader, RequiredCallsReader
from tessera.engine.server.tool_parsers import (
    CallDelta,
    ContentDelta,
    ParsedCall,
    template_knows_tools,
    tool_parser,
)

hermes = tool_parser("hermes")
llama3 = tool_parser("llama3_json")


def call(name, **args):
    return ParsedCall(name, json.dumps(args))


def streamed(reader, pieces):
    """(content, calls) from feeding ``pieces`` to the streaming parser, as a client joins them."""
    stream = reader.stream()
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    names, args = {}, {}
    for d in deltas:
        if isinstance(d, CallDelta):
            if d.name is not None:
                assert d.index not in names and d.index == len(names) and d.arguments == ""
                names[d.index] = d.name
            args[d.index] = args.get(d.index, "") + d.arguments
    calls = [ParsedCall(names[i], args[i]) for i in sorted(names)]
    return (None if calls and not content else content), calls


# -- hermes: Qwen2.5 and SmolLM2 ----------------------------------------------------------------

QWEN_TWO_CALLS = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
    '"date": "2024-10-01"}}\n</tool_call>'
)


def test_hermes_reads_qwen25_calls_and_leaves_no_content():
    content, calls = hermes.parse(QWEN_TWO_CALLS)
    assert content is None
    assert calls == [
        call("get_current_temperature", location="San Francisco, CA, USA"),
        call("get_temperature_date", location="San Francisco, CA, USA", date="2024-10-01"),
    ]


def test_hermes_keeps_the_text_around_calls_as_content():
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\nDone.'
    assert hermes.parse(text) == ("Let me check.Done.", [call("f", x=1)])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}}]</tool_call>',
        '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}},\n'
        '{"name": "get_time", "arguments": {"tz": "CET"}}\n]</tool_call>',
    ],
)
def test_hermes_reads_smollm2s_list_of_calls_in_one_tag(text):
    assert hermes.parse(text) == (None, [call("get_weather", city="Paris"), call("get_time", tz="CET")])


def test_hermes_takes_parameters_and_string_arguments_too():
    text = (
        '<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>'
        '<tool_call>{"name": "g", "arguments": "{\\"b\\": 2}"}</tool_call>'
    )
    assert hermes.parse(text) == (None, [call("f", a=1), call("g", b=2)])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>',  # a brace short
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "The tag <tool_call> is how I call tools.",
        "a <tool_call",
    ],
)
def test_hermes_leaves_what_is_not_a_call_as_content(text):
    assert hermes.parse(text) == (text, [])


@pytest.mark.parametrize("cut", ["", "</tool_", "</"])
def test_hermes_reads_a_call_left_open_at_the_end(cut):
    text = 'Sure. <tool_call>\n{"name": "f", "arguments": {"x": "y"}}\n' + cut
    assert hermes.parse(text) == ("Sure.", [call("f", x="y")])


def test_hermes_malformed_block_next_to_a_good_one():
    text = 'a <tool_call>oops</tool_call>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n b'
    assert hermes.parse(text) == ("a <tool_call>oops</tool_call>b", [call("f")])


def test_plain_text_passes_through_untouched():
    text = "  Paris is the capital of France.\n"
    assert hermes.parse(text) == (text, [])
    assert llama3.parse(text) == (text, [])
    assert streamed(hermes, list(text)) == (text, [])
    assert streamed(llama3, list(text)) == (text, [])


def test_hermes_holds_back_what_may_start_a_tag():
    stream = hermes.stream()
    assert stream.feed("Hi <tool") == [ContentDelta("Hi")]
    assert stream.feed("box>") == [ContentDelta(" <toolbox>")]
    out = stream.feed(' <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    assert out == [CallDelta(0, "", "f"), CallDelta(0, '{"a": 1}')]
    assert stream.finish() == []


# -- llama3_json ---------------------------------------------------------------------------------

LLAMA_CALL = (
    '{"name": "get_current_conditions", '
    '"parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}'
)


@pytest.mark.parametrize("prefix", ["", "<|python_tag|>", " \n"])
def test_llama3_json_reads_a_bare_call_with_or_without_the_python_tag(prefix):
    expected = call("get_current_conditions", location="San Francisco, CA", unit="Fahrenheit")
    assert llama3.parse(prefix + LLAMA_CALL) == (None, [expected])


def test_llama3_json_reads_calls_separated_by_semicolons():
    text = (
        '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": 2}};'
        '{"name": "c", "parameters": {}}'
    )
    assert llama3.parse(text) == (None, [call("a", x=1), call("b", y=2), call("c")])


@pytest.mark.parametrize(
    "text",
    [
        'Here you go: {"name": "a", "parameters": {}}',
        '{"name": "a", "parameters": {}} and then some text',
        '{"name": "a", "parameters": {"x": 1}',
        '{"temperature": 21}',
        "[1, 2, 3]",
    ],
)
def test_llama3_json_takes_anything_but_calls_alone_as_content(text):
    assert llama3.parse(text) == (text, [])


# -- streaming equals the whole parse -----------------------------------------------------------

_CALL_TEXTS = st.sampled_from(
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '{"name": "f", "parameters": {"s": "a } ] \\" <tool_call>"}}',
        '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"n": [1, {"k": null}]}}]',
        "[]",
        '{"name": "f", "arguments": {"x": 1}',  # malformed
        "not json",
    ]
)
_TEXTS = st.sampled_from(["Sure.", "\n", "  ", " a b ", "<tool", "<", "</tool_call>", "{", "x;y", "é€"])


@st.composite
def hermes_outputs(draw):
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            parts.append(draw(_TEXTS))
        else:
            ws = draw(st.sampled_from(["", "\n", " \n "]))
            parts.append(f"<tool_call>{ws}{draw(_CALL_TEXTS)}{ws}")
            if draw(st.integers(0, 4)):  # now and then left open, or cut in the closing tag
                parts.append("</tool_call>")
            elif draw(st.booleans()):
                parts.append("</tool_"[: draw(st.integers(1, 7))])
    return "".join(parts)


@st.composite
def llama3_outputs(draw):
    prefix = draw(st.sampled_from(["", " ", "<|python_tag|>", "<|python", "\n"]))
    calls = draw(st.lists(_CALL_TEXTS, min_size=0, max_size=3))
    tail = draw(st.sampled_from(["", " ", ";", " x", "\n"]))
    body = draw(st.sampled_from(["; ", ";", " ;\n"])).join(calls)
    return prefix + (body if calls or draw(st.booleans()) else draw(_TEXTS)) + tail


def _splits(draw, text):
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hermes_streaming_in_any_pieces_equals_the_whole_parse(data):
    text = data.draw(hermes_outputs())
    whole = hermes.parse(text)
    assert streamed(hermes, list(text)) == whole
    assert streamed(hermes, _splits(data.draw, text)) == whole


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_llama3_json_streaming_in_any_pieces_equals_the_whole_parse(data):
    text = data.draw(llama3_outputs())
    whole = llama3.parse(text)
    assert streamed(llama3, list(text)) == whole
    assert streamed(llama3, _splits(data.draw, text)) == whole


# -- the constrained outputs of tool_choice "required" and a named function -----------------------


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_required_calls_stream_as_each_closes_and_equal_the_whole(data):
    text = '[{"name":"a","arguments":{"s":"}]\\""}},{"name":"b","arguments":{"n":[1,{"k":2}]}}]'
    text = text[: data.draw(st.integers(0, len(text)))] if data.draw(st.booleans()) else text
    whole = RequiredCallsReader().parse(text)
    assert streamed(RequiredCallsReader(), _splits(data.draw, text)) == whole


def test_required_calls_parse():
    text = '[{"name":"a","arguments":{"x":1}},{"name":"b","arguments":{}}]'
    assert RequiredCallsReader().parse(text) == (None, [call("a", x=1), call("b")])
    assert RequiredCallsReader().parse('[{"name":"a","argu') == ('[{"name":"a","argu', [])


def test_a_named_functions_arguments_stream_as_they_come():
    reader = NamedCallReader("f")
    stream = reader.stream()
    assert stream.feed('{"x"') == [CallDelta(0, "", "f"), CallDelta(0, '{"x"')]
    assert stream.feed(":1}") == [CallDelta(0, ":1}")]
    assert reader.parse('{"x":1}') == (None, [ParsedCall("f", '{"x":1}')])


# -- choosing a parser ----------------------------------------------------------------------------

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
)


def test_auto_picks_by_template():
    assert not template_knows_tools(SMOLLM2_TEMPLATE)
    assert tool_parser("auto", SMOLLM2_TEMPLATE).name == "hermes"
    assert tool_parser("auto", None).name == "hermes"
    qwen = "{%- if tools %}<tool_call>{{ tool_call.arguments | tojson }}</tool_call>{% endif %}<|im_end|>"
    assert tool_parser("auto", qwen).name == "hermes"
    llama = '{%- if tools %}{"name": ..., "parameters": ...}{% endif %}<|eot_id|>'
    assert tool_parser("auto", llama).name == "llama3_json"


def test_an_unknown_parser_name_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        tool_parser("mistral")
