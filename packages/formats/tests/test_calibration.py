"""The calibration/evaluation split: disjoint, deterministic, and clear about short text."""

import pytest

from tessera.formats import FormatError
from tessera.formats.calibration import default_text, documents, split_text, token_rows


def test_wiki_splits_into_disjoint_calibration_and_evaluation_documents():
    path = default_text()
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data holds it)")
    split = split_text(path)
    assert len(split.calibration) + len(split.evaluation) == 2349
    assert len(split.evaluation) == 2349 // 5
    assert not set(split.calibration) & set(split.evaluation)


def test_plain_text_splits_into_paragraphs(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph {i}" for i in range(10)))
    assert documents(f)[3] == "paragraph 3"
    split = split_text(f)
    assert split.evaluation == ["paragraph 4", "paragraph 9"]


def test_too_short_text_names_what_it_holds(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a b c d e f")
    with pytest.raises(FormatError, match="hold 1 rows of 4, not the 5 requested"):
        token_rows(documents(f), lambda s: s.split(), rows=5, length=4, source=f)
    assert token_rows(documents(f), lambda s: s.split(), rows=1, length=4, source=f) == [["a", "b", "c", "d"]]


def test_missing_or_binary_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="no such"):
        documents(tmp_path / "nope.txt")
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FormatError, match="not UTF-8"):
        documents(tmp_path / "b.bin")
