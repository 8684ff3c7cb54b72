"""Gemma's SentencePiece vocabulary rebuilt as BPE, on a toy vocabulary (the real one is compared
with transformers in integration_tests/test_gemma3_tokenizer.py)."""

import pytest

from tessera.formats import FormatError, Tokenizer
from tessera.formats.gguf_sentencepiece import merges_from_vocab

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
TOY = [
    ("<pad>", CONTROL),
    ("<eos>", CONTROL),
    ("<bos>", CONTROL),
    ("<unk>", CONTROL),
    ("<start_of_turn>", CONTROL),
    ("<end_of_turn>", CONTROL),
    ("\n", USER_DEFINED),
    ("  ", USER_DEFINED),  # Gemma's files store runs of spaces with real spaces
    *((f"<0x{b:02X}>", BYTE) for b in range(256)),
    ("▁", NORMAL),
    ("a", NORMAL),
    ("b", NORMAL),
    ("ab", NORMAL),
    ("▁a", NORMAL),
    ("▁ab", NORMAL),
]


def toy_meta(**extra) -> dict:
    return {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [t for t, _ in TOY],
        "tokenizer.ggml.token_type": [k for _, k in TOY],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_bos_token": True,
        **extra,
    }


@pytest.fixture(scope="module")
def toy():
    return Tokenizer.from_gguf_metadata(toy_meta(), "toy.gguf")


def test_merges_follow_the_file_order_and_the_longer_left_piece_first():
    vocab = {"a": 0, "b": 1, "ab": 2, "▁": 3, "▁ab": 4, "▁a": 5}
    assert merges_from_vocab(vocab) == [("a", "b"), ("▁a", "b"), ("▁", "ab"), ("▁", "a")]


def test_spaces_become_the_visible_space_and_runs_of_them_one_token(toy):
    ids = {t: i for i, (t, _) in enumerate(TOY)}
    assert toy.encode("ab ab") == [2, ids["ab"], ids["▁ab"]]
    assert toy.encode("  a", add_special_tokens=False) == [ids["  "], ids["a"]]
    assert toy.decode(toy.encode("  ab ab\n")) == "  ab ab\n"


def test_characters_outside_the_vocabulary_fall_back_to_bytes(toy):
    assert toy.encode("é", add_special_tokens=False) == [8 + 0xC3, 8 + 0xA9]
    assert toy.decode(toy.encode("é")) == "é"


def test_control_tokens_are_special_and_end_of_turn_ends_generation(toy):
    assert toy.encode("<start_of_turn>a<end_of_turn>", add_special_tokens=False) == [4, 265, 5]
    assert toy.decode([2, 4, 265, 5]) == "a"
    assert toy.eos_token_ids == (1, 5)


def test_without_add_bos_no_bos_is_added():
    tok = Tokenizer.from_gguf_metadata(toy_meta(**{"tokenizer.ggml.add_bos_token": False}), "toy.gguf")
    assert tok.encode("a") == [265]


def test_a_sentencepiece_vocabulary_of_another_family_is_refused_by_name():
    with pytest.raises(FormatError, match=r"toy.gguf: tokenizer model 'llama' of architecture 'llama'"):
        Tokenizer.from_gguf_metadata(toy_meta(**{"general.architecture": "llama"}), "toy.gguf")
