"""Byte-level BPE tokenizer (GPT-2 style) trained with the Hugging Face `tokenizers` library.

Byte-level means every string round-trips exactly: ``decode(encode(s)) == s`` for any Unicode text, since the
256 byte symbols are always in the vocabulary. Word-start pieces carry the space, shown as ``"Ġ"`` in the raw
vocabulary (``"Ġthe"`` decodes to ``" the"``). Training on the full KJV (4.4 MB) takes about a second.

Saved as one ``tokenizer.json`` (the library's own JSON format, safe to load) in a folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.atomic_io import atomic_write_bytes
from moekit.data.corpus import Corpus

try:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
except ImportError:  # pragma: no cover - depends on the environment
    tokenizers = None

TOKENIZER_FILE = "tokenizer.json"
EOT = "<|endoftext|>"


def _require_tokenizers() -> None:
    if tokenizers is None:  # pragma: no cover - depends on the environment
        raise ImportError("moekit.data.tokenizer needs the `tokenizers` package: pip install 'moekit[lm]'")


@dataclass(frozen=True)
class TokenizerConfig:
    """BPE training options.

    ``vocab_size`` counts the 256 byte symbols, the merges and the special tokens; ``special_tokens[0]`` is
    the end-of-text token placed between documents.
    """

    vocab_size: int = 2048
    min_frequency: int = 2
    special_tokens: tuple[str, ...] = (EOT,)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "min_frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TokenizerConfig.{name} must be an int, got {value!r}")
        if self.vocab_size < 256 + len(self.special_tokens):
            raise ValueError(
                f"TokenizerConfig.vocab_size must be >= 256 + len(special_tokens) = "
                f"{256 + len(self.special_tokens)}, got {self.vocab_size}"
            )
        if self.min_frequency < 1:
            raise ValueError(f"TokenizerConfig.min_frequency must be >= 1, got {self.min_frequency}")
        if not self.special_tokens or not all(isinstance(t, str) and t for t in self.special_tokens):
            raise ValueError(f"TokenizerConfig.special_tokens must be non-empty strings, got {self.special_tokens!r}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"TokenizerConfig.special_tokens has duplicates: {self.special_tokens!r}")


class BPETokenizer:
    """A trained byte-level BPE; wraps a `tokenizers.Tokenizer`.

    Special tokens get the lowest ids (``eot_id == 0`` by default); literal special-token text inside the
    input is encoded as that special token.
    """

    def __init__(self, tokenizer: Any) -> None:
        _require_tokenizers()
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        if not specials:
            raise ValueError("tokenizer has no special (end-of-text) token")
        self.special_tokens: tuple[str, ...] = tuple(sorted(specials, key=lambda t: tokenizer.token_to_id(t)))
        self.eot_token = EOT if EOT in specials else self.special_tokens[0]
        self.eot_id: int = tokenizer.token_to_id(self.eot_token)

    # -- training / persistence -----------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str] | Corpus, config: TokenizerConfig | None = None) -> BPETokenizer:
        """Train on an iterable of strings (e.g. verse texts) or on a `Corpus` (its verse texts)."""
        _require_tokenizers()
        config = config or TokenizerConfig()
        if isinstance(texts, Corpus):
            texts = [v.text for v in texts]
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(config.special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = [False]

        def iterate() -> Iterable[str]:
            for t in texts:
                if not isinstance(t, str):
                    raise ValueError(f"texts must be strings, got {type(t).__name__}")
                seen[0] = seen[0] or bool(t)
                yield t

        tok.train_from_iterator(iterate(), trainer=trainer)
        if not seen[0]:
            raise ValueError("texts is empty: nothing to train the tokenizer on")
        return cls(tok)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path."""
        return atomic_write_bytes(Path(directory) / TOKENIZER_FILE, self._tok.to_str(pretty=False).encode("utf-8"))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> BPETokenizer:
        """Read ``directory/tokenizer.json`` (or the given .json file); errors name the path."""
        _require_tokenizers()
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"tokenizer file {str(path)!r} is not valid UTF-8") from exc
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # the library raises a plain Exception on malformed JSON
            raise ValueError(f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {exc}") from exc
        return cls(tok)

    # -- encode / decode ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (byte symbols + merges + special tokens); ids lie in [0, vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text appended)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many strings at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept, so ``decode(encode(s)) == s``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        """Raw vocabulary string of an id (byte-level symbols, e.g. ``"Ġthe"``)."""
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token_id {token_id} is out of range [0, {self.vocab_size})")
        return token

    def token_to_id(self, token: str) -> int | None:
        """Id of a raw vocabulary string, or None."""
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether the id is one of the special tokens."""
        return self.id_to_token(token_id) in self.special_tokens

    def pieces(self) -> list[str]:
        """Decoded text of every id (``" the"`` for ``"Ġthe"``); incomplete UTF-8 bytes decode to U+FFFD."""
        return [self._tok.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]

    @property
    def backend(self) -> Any:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eot={self.eot_token!r})"


def train_tokenizer(texts: Iterable[str] | Corpus, vocab_size: int = 2048, **kwargs: Any) -> BPETokenizer:
    """Shortcut for ``BPETokenizer.train(texts, TokenizerConfig(vocab_size, ...))``."""
    return BPETokenizer.train(texts, TokenizerConfig(vocab_size=vocab_size, **kwargs))
