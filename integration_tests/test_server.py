"""The real server on a free loopback port, driven by the official openai client and by raw
HTTP for what a client library would never send."""

import asyncio
import json
import re
import time

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("default_model_path")  # skips where the model is absent

openai = pytest.importorskip("openai")

KEY = "test-key"


@pytest.fixture(scope="module")
def server(serve_default_model):
    # fp32, not the CPU's bf16 default: answers and logprobs are checked against transformers' fp32
    # run of the same weights
    args = ("--api-key", KEY, "--kv-cache-memory", "192MiB", "--max-model-len", "1024", "--dtype", "float32")
    with serve_default_model(*args) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_models_lists_the_served_model(client):
    (m,) = client.models.list().data
    assert m.id == MODEL


def test_chat_completion_answers_and_usage_adds_up(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0


def test_chat_streaming_gives_the_role_first_then_the_same_text(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_choices_and_seeds_that_reproduce(client):
    kw = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 3 * 12
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens


def test_completion_streaming_matches_non_streaming(client):
    kw = dict(model=MODEL, prompt="The three primary colors are", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == full


def test_logprobs_shapes(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    # greedy: the sampled token is the most likely one
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == c.choices[0].text


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_with_and_without_include_stop_str(client, include):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert " 6," in text
    r = client.completions.create(
        model=MODEL,
        prompt="1, 2, 3, 4,",
        max_tokens=12,
        temperature=0,
        stop=[" 6,"],
        extra_body={"include_stop_str_in_output": include},
    )
    cut = text[: text.index(" 6,")]
    assert r.choices[0].text == (cut + " 6," if include else cut)
    assert r.choices[0].finish_reason == "stop"
    s = client.completions.create(
        model=MODEL,
        prompt="1, 2, 3, 4,",
        max_tokens=12,
        temperature=0,
        stop=[" 6,"],
        stream=True,
        extra_body={"include_stop_str_in_output": include},
    )
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=30,
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_vllm_extras_in_extra_body(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=6,
        temperature=0.8,
        seed=5,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 6,
            "ignore_eos": True,
            "priority": 1,
            "cache_salt": "tenant-a",
        },
    )
    assert r.usage.completion_tokens == 6


def test_cached_tokens_report_prefix_cache_hits(client):
    long = [{"role": "system", "content": "You answer in French. " * 30}, *QUESTION]
    client.chat.completions.create(model=MODEL, messages=long, temperature=0, max_tokens=2)
    r = client.chat.completions.create(model=MODEL, messages=long, temperature=0, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens >= 128


def test_tokenize_and_detokenize_round_trip(server):
    h = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(f"{server}/tokenize", json={"prompt": "Hello, world"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(f"{server}/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == "Hello, world"


def post(server, path, body, key=KEY, raw=None, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(
        f"{server}{path}", content=raw if raw is not None else json.dumps(body), headers=h, timeout=60
    )


@pytest.mark.parametrize(
    "path,body,raw,key,status,param",
    [
        ("/v1/chat/completions", None, b"{not json", KEY, 400, None),
        ("/v1/chat/completions", {"messages": "hello"}, None, KEY, 400, "messages"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, None, KEY, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, None, KEY, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, None, KEY, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, None, KEY, 400, None),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, None, KEY, 404, "model"),
        ("/v1/completions", {"prompt": "x"}, None, None, 401, None),
        ("/v1/completions", {"prompt": "x"}, None, "wrong", 401, None),
        ("/v1/completions", {"prompt": "word " * 1100}, None, KEY, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, None, KEY, 400, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "response_format": {"type": "yaml"}},
            None,
            KEY,
            400,
            "response_format",
        ),
        ("/v1/completions", {"prompt": "x", "guided_regex": "[a-"}, None, KEY, 400, "response_format"),
        (
            "/v1/completions",
            {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]},
            None,
            KEY,
            400,
            "guided_choice",
        ),
    ],
)
def test_bad_requests_get_their_status_and_an_openai_error(server, path, body, raw, key, status, param):
    r = post(server, path, body, key=key, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_x_request_id_is_echoed_but_the_response_id_is_the_servers_own(server):
    r = post(
        server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, headers={"X-Request-Id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert "abc-123" not in r.json()["id"]


def test_a_bad_request_does_not_disturb_one_in_flight(server, client):
    async def main():
        async with httpx.AsyncClient(timeout=120) as ac:
            good = asyncio.create_task(
                ac.post(
                    f"{server}/v1/completions",
                    headers={"Authorization": f"Bearer {KEY}"},
                    json={
                        "prompt": "Tell me a story.",
                        "max_tokens": 40,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                )
            )
            await asyncio.sleep(0.3)
            bad = await ac.post(
                f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, content=b"{oops"
            )
            return await good, bad

    good, bad = asyncio.run(main())
    assert bad.status_code == 400
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 40


def test_64_concurrent_streams_complete_and_a_disconnect_frees_its_blocks(server):
    async def stream_one(ac, i, drop_after=None):
        chunks = tokens = 0
        async with ac.stream(
            "POST",
            f"{server}/v1/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={
                "prompt": f"Count to ten, number {i}:",
                "max_tokens": 16,
                "temperature": 0.7,
                "seed": i,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            },
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    if line == "data: [DONE]":
                        return tokens, True
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    chunks += 1
                    if drop_after is not None and chunks >= drop_after:
                        return chunks, False  # leaving the block closes the connection
        return chunks, False

    async def main():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(timeout=300, limits=limits) as ac:
            dropped = asyncio.create_task(stream_one(ac, 999, drop_after=2))
            results = await asyncio.gather(*(stream_one(ac, i) for i in range(64)))
            return results, await dropped

    results, dropped = asyncio.run(main())
    assert all(done for _, done in results) and all(n == 16 for n, _ in results)
    assert dropped[1] is False
    deadline = time.time() + 20
    while time.time() < deadline and (
        metric(server, "tessera_kv_cache_usage_ratio") > 0
        or metric(server, "tessera_num_requests_running") > 0
    ):
        time.sleep(0.2)
    assert metric(server, "tessera_kv_cache_usage_ratio") == 0.0
    assert metric(server, 'tessera_requests_total{finish_reason="abort"}') >= 1


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_parses_and_validates(client, seed):
    jsonschema = pytest.importorskip("jsonschema")
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}],
        temperature=0.9,
        seed=seed,
        max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_regex_and_choice(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=60, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    r = client.completions.create(
        model=MODEL,
        prompt="Phone:",
        max_tokens=20,
        temperature=0.7,
        seed=1,
        extra_body={"guided_regex": phone},
    )
    assert re.fullmatch(phone, r.choices[0].text)
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=10,
        extra_body={"guided_choice": ["Paris", "London", "Berlin"]},
    )
    assert r.choices[0].message.content in ("Paris", "London", "Berlin")
    s = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=10,
        stream=True,
        extra_body={"guided_choice": ["Paris", "London", "Berlin"]},
    )
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == r.choices[0].message.content


def test_echo_with_logprobs_scores_the_prompt_like_transformers(
    client, hf_default_model, hf_default_tokenizer
):
    import torch

    prompt = "The quick brown fox jumps over the lazy dog"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    ids = hf_default_tokenizer.encode(prompt)
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_default_model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [ref[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=2e-3)
    assert "".join(lp.tokens) == r.choices[0].text
    s = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1, stream=True
        )
    )
    assert s[0].choices[0].text == prompt and s[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1 : len(ids)], abs=1e-5
    )
