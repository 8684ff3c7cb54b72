"""Tokenization and chat templates against HF transformers on the default model."""

import pytest

from tessera.formats import GGUFCheckpoint

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Ça coûte 12,50 € à Paris — naïve façade, Æsir, Øresund",
    "日本語のテキストと中文文本，还有한국어",
    "emoji: 🤖🚀👍🏽 and flags 🇫🇷 family 👨‍👩‍👧",
    "runs   of    spaces\n\n\nand\ttabs\t\tand\r\nCRLF   ",
    "def f(x):\n    return [i**2 for i in range(x)]  # squares\n",
    "numbers 1234567 3.14159 -42 1e-9 2026-11-25",
    "<|im_start|>user\nhi<|im_end|>",
    "   leading spaces and trailing   ",
    "don't won't it's I'm you're we've they'll she'd",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return GGUFCheckpoint(default_model_path).tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_equal_transformers(tokenizer, hf_default_tokenizer, text):
    assert tokenizer.encode(text) == hf_default_tokenizer.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_digits_after_runs_of_spaces_follow_the_models_pre_tokenizer(tokenizer):
    # llama.cpp's smollm pre-tokenizer isolates digits first; transformers' GGUF conversion
    # drops that split and gives [3522, 216, 216, 32, 30, 39331]
    assert tokenizer.encode("Section  0. Definitions") == [3522, 256, 32, 30, 39331]


def test_chat_template_output_equals_transformers(tokenizer, hf_default_tokenizer):
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And ünïcödé 🤖?"},
    ]
    for add in (True, False):
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add)
        theirs = hf_default_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours == theirs
        assert tokenizer.encode(ours, add_special_tokens=False) == hf_default_tokenizer.encode(
            theirs, add_special_tokens=False
        )


def test_chat_template_with_a_system_message(tokenizer, hf_default_tokenizer):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages) == hf_default_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_special_tokens_and_eos(tokenizer):
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.token_text(2) == "<|im_end|>"
    hello = tokenizer.encode("Hello")
    assert tokenizer.decode([1, *hello, 2]) == "Hello"
    assert tokenizer.decode([1, *hello, 2], skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"
