"""Gemma 3's tokenizer, built from its GGUF, against HF transformers' own tokenizer from the same file."""

import copy
import json

import pytest

from tessera.formats import ChatTemplateError, FormatError, Tokenizer
from tessera.formats.gguf_file import GGUFFile

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces and trailing   ",
    "runs   of    spaces\n\n\nand\ttabs\t\tand\r\nCRLF \t \n mixed",
    "\n\nstarts with newlines",
    "numbers 1234567 3.14159 -42 1e-9 2026-11-25 ١٢٣",
    "日本語のテキストと中文文本，还有한국어",
    "emoji: 🤖🚀👍🏽 and flags 🇫🇷 family 👨‍👩‍👧",
    "Ça coûte 12,50 € à Paris — naïve façade, Æsir, Øresund, ß, İstanbul",
    "def f(x):\n    return [i**2 for i in range(x)]  # squares\n\tif x: {'a': 1}\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a BOS<eos><pad><unk><mask><unused0>[multimodal]",
    "<start_of_turn without its end, and <end_of_turn> glued<end_of_turn>to text",
    "pneumonoultramicroscopicsilicovolcanoconiosis " + "supercalifragilistic" * 50,
    "x" * 3000,
    "rare characters: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \ue000 \x00 \x7f ▁ a▁b",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(gemma3_model_path):
    return Tokenizer.from_gguf_metadata(GGUFFile(gemma3_model_path).fields, str(gemma3_model_path))


@pytest.fixture(scope="module")
def hf_tokenizer(gemma3_model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        gemma3_model_path.parent, gguf_file=gemma3_model_path.name
    )


def test_the_tokenizer_is_built_as_transformers_builds_it(tokenizer, hf_tokenizer):
    # vocabulary, the 514,906 merges in order, normalizer, decoder, added tokens, BOS template
    assert json.loads(tokenizer.hf.to_str()) == json.loads(hf_tokenizer.backend_tokenizer.to_str())


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_equal_transformers(tokenizer, hf_tokenizer, text):
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    # the chat path: the template writes <bos> itself
    assert tokenizer.encode(text, add_special_tokens=False) == hf_tokenizer.encode(
        text, add_special_tokens=False
    )


@pytest.mark.parametrize("text", TEXTS)
def test_decoded_text_equals_transformers(tokenizer, hf_tokenizer, text):
    ids = hf_tokenizer.encode(text)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    # a "▁" typed in the text comes back as a space (SentencePiece's own spelling of one), here as there
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text.replace("\u2581", " ")


def test_bos_eos_and_the_vocabulary(tokenizer, hf_tokenizer):
    assert tokenizer.vocab_size == len(hf_tokenizer) == 262_144
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 2
    assert tokenizer.token_text(2) == "<bos>"
    # <eos>, and <end_of_turn> that ends a chat turn (HF's generation_config: [1, 106])
    assert tokenizer.eos_token_ids == (1, 106)
    assert hf_tokenizer.eos_token_id == 1 and tokenizer.token_text(106) == "<end_of_turn>"
    assert {0, 1, 2, 3, 105, 106} <= tokenizer.special_token_ids
    assert 5 not in tokenizer.special_token_ids  # [multimodal] is user-defined: added, not special


def test_this_file_has_no_chat_template_and_says_so(tokenizer, hf_tokenizer, gemma3_model_path):
    assert tokenizer.chat_template is None and hf_tokenizer.chat_template is None
    with pytest.raises(FormatError, match=f"{gemma3_model_path}: the model has no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# Gemma 3's chat template (google/gemma-3-*-it, tokenizer_config.json): this GGUF carries none, so
# the test gives it to both sides, to check our renderer on the template Gemma chats are written in.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "  Hi there \n"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And ünïcödé 🤖, 日本語?"},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "You read code."}]},
        {"role": "user", "content": [{"type": "text", "text": "def f():\n\treturn 1"}]},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_gemma3_chat_template_renders_and_tokenizes_as_transformers(tokenizer, hf_tokenizer, messages):
    ours = copy.copy(tokenizer)
    ours.chat_template = GEMMA3_CHAT_TEMPLATE
    for add in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=add)
        theirs = hf_tokenizer.apply_chat_template(
            messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=add
        )
        assert text == theirs
        assert ours.encode_chat(messages, add_generation_prompt=add) == hf_tokenizer.encode(
            theirs, add_special_tokens=False
        )
        assert ours.encode_chat(messages)[0] == 2  # one <bos>, from the template


def test_gemma3_chat_template_refuses_roles_out_of_turn_as_transformers_does(tokenizer, hf_tokenizer):
    ours = copy.copy(tokenizer)
    ours.chat_template = GEMMA3_CHAT_TEMPLATE
    messages = [{"role": "assistant", "content": "first"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf_tokenizer.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ours.apply_chat_template(messages)
