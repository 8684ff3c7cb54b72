"""tessera router's decisions without servers: which requests are split between a prefill and a
decode server, and a prefill server's whole answer turned into the stream a client asked for."""

import json

import pytest

from tessera.engine.router import _as_answer, _route

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.mark.parametrize(
    "path, body, route",
    [
        (CHAT, {"messages": []}, "split"),
        (CHAT, {"messages": [], "max_completion_tokens": 1}, "prefill"),
        (CHAT, {"messages": [], "n": 2}, "decode"),
        (CHAT, {"messages": [], "logprobs": True}, "decode"),
        (CHAT, {"messages": [], "kv_transfer_params": {"do_remote_prefill": True}}, "decode"),
        (COMPLETIONS, {"prompt": "hi"}, "split"),
        (COMPLETIONS, {"prompt": [1, 2, 3], "max_tokens": 5}, "split"),
        (COMPLETIONS, {"prompt": ["a", "b"]}, "decode"),
        (COMPLETIONS, {"prompt": [[1, 2], [3]]}, "decode"),
        (COMPLETIONS, {"prompt": "hi", "echo": True}, "decode"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 0}, "decode"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": 1}, "prefill"),
    ],
)
def test_only_requests_a_split_serves_token_for_token_are_split(path, body, route):
    assert _route(body, path) == route


def events(response) -> list:
    lines = response.body.decode().strip().split("\n\n")
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_a_prefill_servers_whole_chat_answer_becomes_a_stream_when_asked():
    answer = {
        "id": "chatcmpl-1",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    body = {"stream": True, "stream_options": {"include_usage": True}}
    first, second, usage = events(_as_answer(answer, body, CHAT))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        second["choices"][0]["delta"]["content"] == "Hi" and second["choices"][0]["finish_reason"] == "stop"
    )
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 1
    assert all(
        e["object"] == "chat.completion.chunk" and e["id"] == "chatcmpl-1" for e in (first, second, usage)
    )
    assert json.loads(_as_answer(answer, {}, CHAT).body) == answer


def test_a_prefill_servers_whole_completion_answer_becomes_a_stream_when_asked():
    answer = {
        "id": "cmpl-1",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "text": ".", "finish_reason": "stop"}],
    }
    (only,) = events(_as_answer(answer, {"stream": True}, COMPLETIONS))
    assert only["object"] == "text_completion" and only["choices"][0]["text"] == "."
