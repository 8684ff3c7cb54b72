"""Tool calling end to end: the real server on the default model, driven by the official openai
client, LangChain and instructor. Forced calls ("required", a named function) always come out as
calls whose arguments satisfy the function's schema; "auto" calls are read from the model's text."""

import json

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("default_model_path")  # skips where the model is absent

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "smollm2-135m-instruct"
KEY = "test-key"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
BOOK = {
    "type": "function",
    "function": {
        "name": "book_table",
        "description": "Book a table at a restaurant",
        "parameters": {
            "type": "object",
            "properties": {
                "restaurant": {"type": "string"},
                "people": {"type": "integer", "minimum": 1, "maximum": 12},
                "time": {"type": "string", "enum": ["lunch", "dinner"]},
            },
            "required": ["restaurant", "people", "time"],
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, BOOK)}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
# on this prompt the default model writes a <tool_call> block under the server's hermes
# instructions (greedy, fp32); the question alone gets a plain answer
AUTO_PROMPT = [{"role": "user", "content": "What's the weather in Paris? Reply with <tool_call>."}]


@pytest.fixture(scope="module")
def server(serve_default_model):
    # fp32, as test_server.py: the greedy answers below (the auto call) are this dtype's
    args = ("--api-key", KEY, "--kv-cache-memory", "192MiB", "--max-model-len", "2048", "--dtype", "float32")
    with serve_default_model(*args) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def assert_valid_calls(calls):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def streamed(chunks):
    """(content, [(id, name, arguments)], finish_reason) joined from stream chunks, as a client does."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.type == "function" and d.function.arguments == ""
                calls[d.index] = [d.id, d.function.name, ""]
            else:
                assert d.function.name is None
            calls[d.index][2] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def as_tuples(calls):
    return [(c.function.name, c.function.arguments) for c in calls]


# -- forced calls --------------------------------------------------------------------------------


def test_a_named_function_is_called_with_arguments_that_fit_its_schema(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Book a table for four at Chez Paul for dinner."}],
        tools=[WEATHER, BOOK],
        tool_choice={"type": "function", "function": {"name": "book_table"}},
        temperature=0,
        max_tokens=80,
    )
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "book_table"
    assert_valid_calls([call])
    content, calls, finish = streamed(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(n, a) for _, n, a in calls] == as_tuples([call])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_calls_among_the_tools_streamed_or_not(client, parallel):
    kw = dict(
        model=MODEL,
        messages=PARIS,
        tools=[WEATHER, BOOK],
        tool_choice="required",
        parallel_tool_calls=parallel,
        temperature=0,
        max_tokens=120,
    )
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)
    if not parallel:
        assert len(choice.message.tool_calls) == 1
    content, calls, finish = streamed(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(n, a) for _, n, a in calls] == as_tuples(choice.message.tool_calls)


def test_each_of_n_choices_is_read_on_its_own(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=PARIS,
        tools=[WEATHER, BOOK],
        tool_choice="required",
        n=3,
        temperature=0.9,
        seed=7,
        max_tokens=120,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message.tool_calls)


def test_a_forced_call_cut_by_max_tokens_says_length(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=PARIS,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=2,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


# -- auto ----------------------------------------------------------------------------------------


def test_auto_reads_the_call_the_model_writes(client):
    kw = dict(model=MODEL, messages=AUTO_PROMPT, tools=[WEATHER], temperature=0, max_tokens=100)
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert message.tool_calls, message.content
    assert "<tool_call>" not in (message.content or "")
    call = message.tool_calls[0]
    assert call.id.startswith("call_") and isinstance(json.loads(call.function.arguments), dict)
    content, calls, finish = streamed(client.chat.completions.create(**kw, stream=True))
    assert finish == r.choices[0].finish_reason
    assert content == (message.content or "")
    assert [(n, a) for _, n, a in calls] == as_tuples(message.tool_calls)


def test_auto_without_a_call_is_a_plain_answer(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        tools=[WEATHER],
        temperature=0,
        max_tokens=20,
    )
    assert r.choices[0].message.tool_calls is None
    assert "Paris" in r.choices[0].message.content


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(client):
    plain = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=12)
    none = client.chat.completions.create(
        model=MODEL, messages=PARIS, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12
    )
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


# -- a conversation with calls and results -------------------------------------------------------

HISTORY = [
    *PARIS,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "sunny"}'},
]


def test_calls_and_results_sent_back_render_through_the_template(server, client):
    r = httpx.post(
        f"{server}/tokenize",
        json={"messages": HISTORY},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    ids = r.json()["tokens"]
    d = httpx.post(f"{server}/detokenize", json={"tokens": ids}, headers={"Authorization": f"Bearer {KEY}"})
    prompt = d.json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert (
        '<|im_start|>user\n<tool_response>\n{"temperature_c": 21, "sky": "sunny"}\n</tool_response>' in prompt
    )
    r = client.chat.completions.create(
        model=MODEL, messages=HISTORY, tools=[WEATHER], temperature=0, max_tokens=30
    )
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


# -- bad requests --------------------------------------------------------------------------------

Q = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "description": "x" * 300_000}}]},
            "tools",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a+"}, "guided_regex"),
        (
            {"messages": [*Q, {"role": "tool", "content": "42"}]},
            "messages[1].tool_call_id",
        ),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_field(server, body, param):
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"messages": Q, "max_tokens": 1, **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


# -- client libraries ----------------------------------------------------------------------------


def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    llm = langchain_openai.ChatOpenAI(
        model=MODEL, base_url=f"{server}/v1", api_key=KEY, temperature=0, max_tokens=100, max_retries=0
    )
    msg = llm.bind_tools([WEATHER]).invoke(AUTO_PROMPT[0]["content"])
    assert msg.tool_calls and isinstance(msg.tool_calls[0]["args"], dict)

    def get_weather(city: str) -> str:
        """Get the current weather in a given city."""
        return "sunny"

    forced = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert forced.tool_calls[0]["name"] == "get_weather" and isinstance(
        forced.tool_calls[0]["args"]["city"], str
    )

    class Person(BaseModel):
        """A person."""

        name: str = Field(description="the person's name")
        age: int = Field(ge=0, le=130)

    person = llm.with_structured_output(Person, method="function_calling").invoke(
        "Alice is 31 years old. Who is she?"
    )
    assert isinstance(person, Person) and 0 <= person.age <= 130


def test_instructor_tools_mode(client):
    instructor = pytest.importorskip("instructor")
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    city = patched.chat.completions.create(
        model=MODEL,
        response_model=City,
        messages=[{"role": "user", "content": "Paris is the capital of France. Extract the city."}],
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    assert isinstance(city, City) and city.name
