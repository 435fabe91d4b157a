from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from moekit.data import BOOK_PARTS, BOOKS, PART_NAMES, Corpus, SplitConfig, load_kjv, load_text
from moekit.data.corpus import KJV_PATH


def test_bundled_file_is_small() -> None:
    assert KJV_PATH.is_file()
    assert KJV_PATH.stat().st_size < 2 * 1024 * 1024


def test_kjv_books_verses_canonical_order(kjv: Corpus) -> None:
    assert len(kjv) == 31_102
    assert kjv.books == BOOKS and len(BOOKS) == 66
    # every book present, in canonical order, each a contiguous run
    runs = [v.book_index for v in kjv]
    assert sorted(set(runs)) == list(range(66))
    assert runs == sorted(runs)
    assert [d[0].book for d in kjv.documents()] == list(BOOKS)
    assert len(kjv.chapters()) == 1189
    first, last = kjv.verses[0], kjv.verses[-1]
    assert (first.book, first.chapter, first.verse) == ("Genesis", 1, 1)
    assert first.text.startswith("In the beginning God created")
    assert (last.ref, last.text) == (
        "Revelation 22:21",
        "The grace of our Lord Jesus Christ be with you all. Amen.",
    )
    psalms = [v for v in kjv if v.book == "Psalms"]
    assert max(v.chapter for v in psalms) == 150
    assert sum(1 for v in psalms if v.chapter == 119) == 176
    assert sum(1 for v in kjv if v.book == "Jonah" and v.chapter == 1) == 17
    assert all(v.text and v.text == v.text.strip() and "\n" not in v.text for v in kjv)


def test_parts_cover_every_book(kjv: Corpus) -> None:
    assert set(BOOK_PARTS) == set(BOOKS)
    assert set(BOOK_PARTS.values()) == set(PART_NAMES)
    assert kjv.part_names == PART_NAMES
    assert all(v.part == BOOK_PARTS[v.book] for v in kjv)
    expect = {
        "Genesis": "law", "Deuteronomy": "law", "Joshua": "history", "Esther": "history", "Acts": "history",
        "Job": "poetry", "Song of Solomon": "poetry", "Isaiah": "prophets", "Malachi": "prophets",
        "Revelation": "prophets", "Matthew": "gospels", "John": "gospels",
        "Romans": "epistles", "Jude": "epistles",
    }  # fmt: skip
    for book, part in expect.items():
        assert BOOK_PARTS[book] == part
    stats = kjv.part_stats()
    assert {p: s["books"] for p, s in stats.items()} == {
        "law": 5, "history": 13, "poetry": 5, "prophets": 18, "gospels": 4, "epistles": 21
    }  # fmt: skip
    assert sum(s["verses"] for s in stats.values()) == len(kjv)
    assert kjv.part_id(kjv.verses[0]) == 0


def _keys(c: Corpus) -> set[tuple[int, int]]:
    return set(c.chapters())


def test_split_disjoint_deterministic(kjv: Corpus) -> None:
    train, val = kjv.split()
    assert _keys(train).isdisjoint(_keys(val))
    assert _keys(train) | _keys(val) == _keys(kjv)
    assert len(train) + len(val) == len(kjv)
    assert len(_keys(val)) == 1189 // 20
    train2, val2 = kjv.split(SplitConfig())
    assert train2.verses == train.verses and val2.verses == val.verses
    # held-out chapters are whole: every verse of a held-out chapter is in val
    ref = {(v.book_index, v.chapter): 0 for v in kjv}
    for v in kjv:
        ref[(v.book_index, v.chapter)] += 1
    for key in _keys(val):
        assert sum(1 for v in val if (v.book_index, v.chapter) == key) == ref[key]
    assert len(val.documents()) == len(_keys(val))  # each held-out chapter is its own document


def test_seeded_split(kjv: Corpus) -> None:
    a = kjv.split(SplitConfig(every=10, seed=1))[1]
    b = kjv.split(SplitConfig(every=10, seed=1))[1]
    c = kjv.split(SplitConfig(every=10, seed=2))[1]
    assert _keys(a) == _keys(b) != _keys(c)
    assert len(_keys(a)) == 1189 // 10
    assert _keys(a) != _keys(kjv.split(SplitConfig(every=10))[1])


@pytest.mark.parametrize("kwargs", [{"every": 1}, {"every": 2.5}, {"seed": "x"}, {"every": True}])
def test_split_config_validation(kwargs: dict) -> None:
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"SplitConfig.{field}"):
        SplitConfig(**kwargs)


def test_load_text_file_and_folder(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("first line\nsecond line\n\nfourth\n", encoding="utf-8")
    c = load_text(f, lines_per_chapter=2)
    assert c.text() == "first line\nsecond line\n\nfourth"
    assert [(v.chapter, v.verse) for v in c] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert c.part_names == () and all(v.part is None for v in c)
    train, val = c.split(SplitConfig(every=20))  # fewer chapters than `every`: the last one is held out
    assert [v.text for v in val] == ["", "fourth"]

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\r\nline two\r\n", encoding="utf-8")
    (folder / "sub" / "a.md").write_text("\ufeffay", encoding="utf-8")
    (folder / "c.txt.gz").write_bytes(gzip.compress("gzipped ünïcode".encode()))
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / ".hidden.txt").write_text("skip me", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG\xff")
    c = load_text(folder)
    assert c.books == ("b.txt", "c.txt.gz", "sub/a.md")
    assert [v.text for v in c] == ["bee", "line two", "gzipped ünïcode", "ay"]


def test_load_text_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt.*no text"):
        load_text(empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not valid UTF-8"):
        load_text(bad)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_text(folder)
    (folder / "x.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no text"):
        load_text(folder)
    (folder / "y.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"y\.txt.*UTF-8"):
        load_text(folder)
    with pytest.raises(ValueError, match="lines_per_chapter"):
        load_text(empty, lines_per_chapter=0)
    single = tmp_path / "single.txt"
    single.write_text("only one line", encoding="utf-8")
    with pytest.raises(ValueError, match="need at least 2"):
        load_text(single).split()


def test_load_kjv_bad_file(tmp_path: Path) -> None:
    p = tmp_path / "kjv.txt.gz"
    p.write_bytes(gzip.compress(b"Genesis\tnot-a-ref\ttext\n"))
    with pytest.raises(ValueError, match=r"kjv\.txt\.gz:1"):
        load_kjv(p)
    p.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not valid gzip"):
        load_kjv(p)
