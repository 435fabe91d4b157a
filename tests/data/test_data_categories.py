from __future__ import annotations

import pytest

from moekit.data import CATEGORY_NAMES, BPETokenizer, category_ids, token_categories, token_category


@pytest.mark.parametrize(
    ("piece", "category"),
    [
        (",", "punctuation"),
        (" (", "punctuation"),
        ("Ġ;", "punctuation"),
        ("42", "digits"),
        (" 7", "digits"),
        (" the", "stop_word"),
        ("Ġthe", "stop_word"),
        ("And", "stop_word"),  # verse-initial, no leading space
        (" unto", "stop_word"),
        (" thee", "stop_word"),
        ("the", "continuation"),  # lower case, no space: inside a word ("bro|the|r")
        (" LORD", "capitalised"),
        ("Jesus", "capitalised"),
        (" begat", "word_start"),
        ("Ġfirmament", "word_start"),
        ("eth", "continuation"),
        ("'s", "continuation"),
        ("\n", "whitespace"),
        ("  ", "whitespace"),
        ("Ġ", "whitespace"),
        ("\ufffd", "other"),
        (" a1", "other"),
        ("", "other"),
    ],
)
def test_token_category(piece: str, category: str) -> None:
    assert category in CATEGORY_NAMES
    assert token_category(piece) == category


def test_token_categories_for_vocab(small_tokenizer: BPETokenizer) -> None:
    cats = token_categories(small_tokenizer)
    assert len(cats) == small_tokenizer.vocab_size
    assert set(cats) <= set(CATEGORY_NAMES)
    assert cats[small_tokenizer.eot_id] == "special"
    the = small_tokenizer.encode(" the")
    assert len(the) == 1 and cats[the[0]] == "stop_word"
    assert cats[small_tokenizer.encode(",")[0]] == "punctuation"
    assert {"word_start", "continuation", "capitalised", "digits", "whitespace"} <= set(cats)
    ids = category_ids(small_tokenizer)
    assert [CATEGORY_NAMES[i] for i in ids] == cats


def test_bad_piece() -> None:
    with pytest.raises(ValueError, match="piece"):
        token_category(3)  # type: ignore[arg-type]
