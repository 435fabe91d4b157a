"""Documents in, chunks out: read a UTF-8 file or a folder of them, split texts into word-bounded chunks."""

from __future__ import annotations

import bisect
import gzip
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


@dataclass(frozen=True)
class Document:
    """A named text (the name is its id inside an index: unique)."""

    name: str
    text: str


@dataclass(frozen=True)
class ChunkConfig:
    """Sentences are packed into chunks of at most ``max_words`` words; consecutive chunks of a document share
    their last/first ``overlap_words`` words (a sentence longer than ``max_words`` is cut by words)."""

    max_words: int = 120
    overlap_words: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_words, bool) or not isinstance(self.max_words, int) or self.max_words < 1:
            raise ValueError(f"ChunkConfig.max_words must be an int >= 1, got {self.max_words!r}")
        if not isinstance(self.overlap_words, int) or not 0 <= self.overlap_words < self.max_words:
            raise ValueError(f"ChunkConfig.overlap_words must be an int in [0, max_words), got {self.overlap_words!r}")


def chunk_text(text: str, config: ChunkConfig | None = None) -> list[str]:
    """Split one text into chunks (whitespace-normalised); [] for blank text.

    Each chunk ends at the last sentence (or paragraph) end within ``max_words`` words, or is cut at
    ``max_words`` when there is none; the next one starts ``overlap_words`` words before that end.
    """
    config = config or ChunkConfig()
    words: list[str] = []
    ends: list[int] = []  # word counts at which a sentence ends
    for para in re.split(r"\n\s*\n", text):
        for sent in _SENTENCE_END.split(para):
            w = sent.split()
            if w:
                words += w
                ends.append(len(words))
    chunks: list[str] = []
    start = 0
    while start < len(words):
        limit = min(start + config.max_words, len(words))
        i = bisect.bisect_right(ends, limit) - 1
        stop = ends[i] if i >= 0 and ends[i] > start else limit
        chunks.append(" ".join(words[start:stop]))
        if stop >= len(words):
            break
        start = max(stop - config.overlap_words, start + 1)
    return chunks


def as_documents(docs: Iterable[Document] | Mapping[str, str] | Sequence[tuple[str, str]]) -> list[Document]:
    """Documents given as `Document`s, a name -> text mapping or (name, text) pairs; names must be unique."""
    items = docs.items() if isinstance(docs, Mapping) else docs
    out: list[Document] = []
    for d in items:
        doc = d if isinstance(d, Document) else Document(*d)
        if not isinstance(doc.name, str) or not doc.name:
            raise ValueError(f"document names must be non-empty strings, got {doc.name!r}")
        if not isinstance(doc.text, str):
            raise ValueError(f"document {doc.name!r}: text must be a string, got {type(doc.text).__name__}")
        out.append(doc)
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ValueError(f"document names must be unique; repeated: {dup}")
    return out


def read_documents(path: str | os.PathLike[str]) -> list[Document]:
    """A UTF-8 text file, or every text file under a folder (recursive, sorted, hidden files skipped), as
    documents named by their path relative to the folder. ``.gz`` files are decompressed.

    Raises ValueError naming the file when it is missing, not valid UTF-8, or when no file holds any text.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"documents path {str(root)!r} does not exist")
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and _is_text_name(p.name)
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        named = [(p.relative_to(root).as_posix(), p) for p in files]
        if not named:
            raise ValueError(f"documents folder {str(root)!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    else:
        named = [(root.name, root)]
    docs = [Document(name, _read_text(p)) for name, p in named]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"documents path {str(root)!r} holds no text (empty corpus)")
    return docs


def _is_text_name(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    return base.lower().endswith(TEXT_SUFFIXES)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"document {str(path)!r} is not valid gzip: {exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"document {str(path)!r} is not valid UTF-8 (byte offset {exc.start}): {exc.reason}") from exc
