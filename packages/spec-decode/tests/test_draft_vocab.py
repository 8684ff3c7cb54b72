"""The draft's vocabulary: the most frequent tokens of a corpus (ties by lower id), the special
tokens always, a multiple of 16 rows; corpora read from a file, a folder, or Python's library."""

import pytest

from tessera.spec_decode.draft_vocab import (
    cached_frequent_tokens,
    default_corpus,
    frequent_tokens,
    read_corpus,
)


def encode_chars(texts):
    """A tokenizer of one token per character: its code point."""
    return [[ord(c) for c in t] for t in texts]


def test_the_most_frequent_tokens_then_special_ones_then_up_to_a_multiple():
    texts = ["aaaa bbb cc d", "aa"]  # a: 6, b: 3, space: 3, c: 2, d: 1
    got = frequent_tokens(encode_chars, 128, 3, texts, keep=[127], multiple=1)
    # b and space tie at 3: the lower id (space, 32) first
    assert got == sorted([ord("a"), ord(" "), ord("b"), 127])
    got16 = frequent_tokens(encode_chars, 128, 3, texts, keep=[127], multiple=16)
    assert len(got16) == 16 and set(got) <= set(got16)
    # after the corpus's tokens (c, d), the unused ones by id: 0, 1, ...
    assert set(got16) - set(got) == {ord("c"), ord("d"), *range(10)}
    # a size past the vocabulary keeps it all
    assert frequent_tokens(encode_chars, 128, 1000, texts, multiple=16) == list(range(128))
    with pytest.raises(ValueError, match="at least 1"):
        frequent_tokens(encode_chars, 128, 0, texts)


def test_ids_outside_the_vocabulary_are_ignored():
    assert frequent_tokens(lambda t: [[5, 5, 999, -1]], 10, 1, ["x"], multiple=1) == [5]


def test_corpora_from_a_file_a_folder_and_the_standard_library(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_bytes(b"beta \xff\xfe")  # not UTF-8: replaced, not refused
    assert "".join(read_corpus(tmp_path / "a.txt")) == "alpha " * 100
    text = "".join(read_corpus(tmp_path))
    assert "alpha" in text and "beta" in text
    assert len("".join(read_corpus(tmp_path, max_bytes=10))) == 10
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a file or folder"):
        read_corpus(tmp_path / "missing")
    lib = default_corpus(max_bytes=1 << 20)
    assert 0 < sum(len(t) for t in lib) <= 1 << 20 and "def " in "".join(lib)


def test_the_ranking_is_kept_on_disk_keyed_by_all_it_depends_on(tmp_path):
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return encode_chars(texts)

    texts = ["aaaa bbb cc d"]
    kw = dict(keep=[127], multiple=1, tokenizer_key="chars", cache_dir=tmp_path)
    first = cached_frequent_tokens(counting, 128, 3, texts, **kw)
    assert first == frequent_tokens(encode_chars, 128, 3, texts, keep=[127], multiple=1)
    assert cached_frequent_tokens(counting, 128, 3, texts, **kw) == first and len(calls) == 1
    # another tokenizer, corpus or size: ranked afresh
    cached_frequent_tokens(counting, 128, 3, texts, **{**kw, "tokenizer_key": "other"})
    cached_frequent_tokens(counting, 128, 3, ["dddd"], **kw)
    cached_frequent_tokens(counting, 128, 2, texts, **kw)
    assert len(calls) == 4
    # a damaged file is ranked again and rewritten
    alone = tmp_path / "alone"
    cached_frequent_tokens(counting, 128, 3, texts, **{**kw, "cache_dir": alone})
    (f,) = alone.iterdir()
    damaged = (("[1, 2", 6), ("[500]", 7), ("[2, 1, 127]", 8), ('[1, "a", 127]', 9), (None, 9))
    for damage, ranked in damaged:
        if damage is not None:
            f.write_text(damage)  # cut short; outside the vocabulary; not sorted; not ids
        assert cached_frequent_tokens(counting, 128, 3, texts, **{**kw, "cache_dir": alone}) == first
        assert len(calls) == ranked
    # no cache folder: nothing kept
    cached_frequent_tokens(counting, 128, 3, texts, **{**kw, "cache_dir": None})
    assert len(calls) == 10
