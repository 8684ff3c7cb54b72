"""Incremental detokenization against the tokenizer's own full decode."""

import pytest

from tessera.engine.detokenizer import IncrementalDetokenizer
from tessera.formats import open_checkpoint

pytestmark = pytest.mark.usefixtures("default_model_path")  # skips where the model is absent


@pytest.fixture(scope="module")
def tok(default_model_path):
    return open_checkpoint(default_model_path).tokenizer()


TEXTS = [
    "héllo wörld ✓",
    "日本語のテキスト",
    "emoji 🤖🚀👨‍👩‍👧 end",
    "plain ascii, with spaces  and\nnewlines",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_split_a_character_and_add_up_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, tok.encode("Prompt:"))
    deltas = [d.add_tokens([t]) for t in ids]
    assert "".join(deltas) == tok.decode(ids) == d.text
    assert all("\ufffd" not in x for x in deltas)


def test_a_stop_string_split_across_tokens_is_found_and_cut(tok):
    ids = tok.encode("one two three STOP four five")
    d = IncrementalDetokenizer(tok, [], stop=["STOP"])
    out = "".join(d.add_tokens([t]) for t in ids)
    assert d.stopped_by == "STOP"
    assert d.text == "one two three "
    kept = IncrementalDetokenizer(tok, [], stop=["ee ST"], include_stop_str_in_output=True)
    for t in ids:
        kept.add_tokens([t])
    assert kept.text == "one two three ST"
    assert out.startswith("one two")
