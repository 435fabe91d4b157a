"""Coarse token categories for expert-specialization reports ("does expert 3 take the punctuation?").

Categories are decided from the decoded piece alone (no context), first match wins:

- ``special``: a special token such as ``<|endoftext|>`` (only via `token_categories`).
- ``whitespace``: only spaces / newlines / tabs.
- ``punctuation``: only punctuation or symbols, after dropping the leading space (``","``, ``" ("``).
- ``digits``: only digits (after dropping the leading space).
- ``stop_word``: a whole stop word (`STOP_WORDS`, case-insensitive) that starts a word: with the leading
  space (``" the"``), or capitalised without it (``"And"``: verses and sentences start without a space).
  A lower-case piece without the space (``"in"`` as in ``"br|in|g"``) is a continuation, not a stop word.
- ``capitalised``: starts with an upper-case letter (``" LORD"``, ``"Jesus"``).
- ``word_start``: lower-case letters with the leading space (byte-level BPE's ``"Ġ"``).
- ``continuation``: lower-case letters without it (the inside or end of a word).
- ``other``: anything else (mixed letters and digits, partial UTF-8 bytes, ...).
"""

from __future__ import annotations

import unicodedata
from typing import Protocol

CATEGORY_NAMES: tuple[str, ...] = (
    "special",
    "whitespace",
    "punctuation",
    "digits",
    "stop_word",
    "capitalised",
    "word_start",
    "continuation",
    "other",
)

# A small English stop-word list, plus Early Modern English function words of the KJV (thee, unto, hath...).
STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
    not now of off on once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too under until up very
    was we were what when where which while who whom why will with would you your yours yourself yourselves
    also upon shall may might must let us o
    thee thou thy thine ye hath hast doth dost art shalt wilt unto thereof therein thereby wherefore whither
    whence hither thither yea nay lo
    """.split()
)

_SPACE_MARK = "\u0120"  # "Ġ": how byte-level BPE shows a leading space in the raw vocabulary


class _Vocab(Protocol):
    vocab_size: int

    def pieces(self) -> list[str]: ...

    def is_special(self, token_id: int) -> bool: ...


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"  # punctuation or symbol


def token_category(piece: str) -> str:
    """Category of one decoded token piece (a raw ``"Ġ"`` prefix counts as the leading space)."""
    if not isinstance(piece, str):
        raise ValueError(f"piece must be a str, got {type(piece).__name__}")
    if piece.startswith(_SPACE_MARK):
        piece = " " + piece[1:]
    if piece == "" or "\ufffd" in piece:
        return "other"  # partial UTF-8 byte sequences decode to U+FFFD
    if piece.isspace():
        return "whitespace"
    space = piece.startswith(" ")
    core = piece[1:] if space else piece
    if core == "" or core.isspace() or core != core.strip():
        return "other"  # e.g. " \n" or a piece with inner/trailing whitespace
    if all(_is_punct(ch) for ch in core):
        return "punctuation"
    if core.isdigit():
        return "digits"
    if any(ch.isalpha() for ch in core) and all(ch.isalpha() or ch == "'" for ch in core):
        upper = core[0].isupper()
        if core.lower() in STOP_WORDS and (space or upper):
            return "stop_word"
        if upper:
            return "capitalised"
        if core[0] == "'":
            return "continuation"  # "'s"
        return "word_start" if space else "continuation"
    return "other"


def token_categories(tokenizer: _Vocab) -> list[str]:
    """Category of every vocabulary id: `token_category` of its decoded piece, ``special`` for specials."""
    pieces = tokenizer.pieces()
    return ["special" if tokenizer.is_special(i) else token_category(p) for i, p in enumerate(pieces)]


def category_ids(tokenizer: _Vocab) -> list[int]:
    """Like `token_categories`, as indices into `CATEGORY_NAMES` (handy for a lookup tensor)."""
    index = {name: i for i, name in enumerate(CATEGORY_NAMES)}
    return [index[c] for c in token_categories(tokenizer)]
