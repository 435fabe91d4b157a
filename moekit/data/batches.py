"""Token streams and reproducible (B, L+1) training windows.

- `TokenStream.from_corpus` encodes a `Corpus` verse by verse (each verse followed by a newline, each document
  followed by the end-of-text token) and keeps, per token, the Bible part id and book id it came from.
- `BatchSampler.batch(step)` is a pure function of ``(seed, step)`` for a given stream and config, so a run
  resumed at step i sees exactly the batches it would have seen. Order: the stream is cut into ``W`` windows
  of ``L+1`` tokens (stride ``L``, so every target is covered); each epoch shuffles them with a permutation
  and shifts them by an offset, both drawn from ``SeedSequence([seed, epoch])``; sample ``j`` of the run is
  window ``j % W`` of epoch ``j // W``. Every window is seen once per epoch.
- `validation_batches` walks a stream in order with non-overlapping targets: deterministic, no seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from moekit.atomic_io import atomic_write_bytes
from moekit.data.corpus import Corpus

UNKNOWN = -1  # part / book id of tokens whose origin is not known


class _Encoder(Protocol):
    eot_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True, eq=False)
class TokenStream:
    """A flat token stream with aligned per-token origins.

    Shapes: ``ids`` (N,) int32 token ids; ``part_ids`` (N,) int8 index into ``part_names`` or -1 (unknown);
    ``book_ids`` (N,) int32 index into ``book_names`` or -1. The end-of-text token after a document carries
    that document's part and book.
    """

    ids: Tensor
    part_ids: Tensor
    book_ids: Tensor
    part_names: tuple[str, ...] = ()
    book_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, dtype in (("ids", torch.int32), ("part_ids", torch.int8), ("book_ids", torch.int32)):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != dtype:
                raise ValueError(f"TokenStream.{name} must be a 1-D {dtype} tensor")
            if t.shape != self.ids.shape:
                raise ValueError(f"TokenStream.{name} has shape {tuple(t.shape)}, ids has {tuple(self.ids.shape)}")
        if self.ids.numel() == 0:
            raise ValueError("TokenStream.ids is empty")
        if int(self.ids.min()) < 0:
            raise ValueError("TokenStream.ids must be >= 0")
        for name, names in (("part_ids", self.part_names), ("book_ids", self.book_names)):
            t = getattr(self, name)
            if int(t.min()) < UNKNOWN or int(t.max()) >= len(names):
                raise ValueError(f"TokenStream.{name} must lie in [-1, {len(names)})")

    def __len__(self) -> int:
        return int(self.ids.numel())

    @classmethod
    def from_ids(cls, ids: Sequence[int] | Tensor | np.ndarray) -> TokenStream:
        """A stream of bare ids (origins unknown)."""
        t = torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(torch.int32)
        n = t.numel()
        return cls(t, torch.full((n,), UNKNOWN, dtype=torch.int8), torch.full((n,), UNKNOWN, dtype=torch.int32))

    @classmethod
    def from_corpus(cls, corpus: Corpus, tokenizer: _Encoder, add_eot: bool = True) -> TokenStream:
        """Encode every verse as ``text + "\\n"``; append ``tokenizer.eot_id`` after each document."""
        verses = corpus.verses
        encoded = tokenizer.encode_batch([v.text + "\n" for v in verses])
        lengths = [len(e) for e in encoded]
        part_of = [corpus.part_id(v) for v in verses]
        book_of = [v.book_index for v in verses]
        chunks: list[list[int]] = []
        chunk_parts: list[int] = []
        chunk_books: list[int] = []
        chunk_lens: list[int] = []
        i = 0
        for doc in corpus.documents():
            for _ in doc:
                chunks.append(encoded[i])
                chunk_parts.append(part_of[i])
                chunk_books.append(book_of[i])
                chunk_lens.append(lengths[i])
                i += 1
            if add_eot:
                chunks.append([tokenizer.eot_id])
                chunk_parts.append(part_of[i - 1])
                chunk_books.append(book_of[i - 1])
                chunk_lens.append(1)
        ids = np.fromiter((t for c in chunks for t in c), dtype=np.int64, count=sum(chunk_lens))
        part_ids = np.repeat(np.asarray(chunk_parts, dtype=np.int8), chunk_lens)
        book_ids = np.repeat(np.asarray(chunk_books, dtype=np.int32), chunk_lens)
        return cls(
            torch.from_numpy(ids.astype(np.int32)),
            torch.from_numpy(part_ids),
            torch.from_numpy(book_ids),
            corpus.part_names,
            corpus.books,
        )

    def part_counts(self) -> dict[str, int]:
        """Tokens per part name (``"unknown"`` for -1)."""
        counts = torch.bincount(self.part_ids.long() + 1, minlength=len(self.part_names) + 1).tolist()
        out = {name: counts[i + 1] for i, name in enumerate(self.part_names)}
        if counts[0]:
            out["unknown"] = counts[0]
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a ``.safetensors`` file atomically (names in the metadata as JSON)."""
        from safetensors.torch import save

        data = save(
            {"ids": self.ids, "part_ids": self.part_ids, "book_ids": self.book_ids},
            metadata={"part_names": json.dumps(self.part_names), "book_names": json.dumps(self.book_names)},
        )
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStream:
        """Read a file written by `save`; errors name the path."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"token stream file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("ids", "part_ids", "book_ids")}
            names = {k: tuple(json.loads(meta.get(k, "[]"))) for k in ("part_names", "book_names")}
        except Exception as exc:
            raise ValueError(f"token stream file {str(path)!r} is not a valid stream file: {exc}") from exc
        return cls(tensors["ids"], tensors["part_ids"], tensors["book_ids"], names["part_names"], names["book_names"])


@dataclass(frozen=True)
class Batch:
    """B windows of L+1 consecutive tokens with their origins.

    Shapes: ``tokens``, ``part_ids``, ``book_ids`` (B, L+1) int64; ``starts`` (B,) int64 stream offsets.
    """

    tokens: Tensor
    part_ids: Tensor
    book_ids: Tensor
    starts: Tensor

    @property
    def inputs(self) -> Tensor:
        """(B, L) model inputs."""
        return self.tokens[:, :-1]

    @property
    def targets(self) -> Tensor:
        """(B, L) next-token targets."""
        return self.tokens[:, 1:]

    @property
    def target_part_ids(self) -> Tensor:
        """(B, L) part id of each target token."""
        return self.part_ids[:, 1:]

    @property
    def input_part_ids(self) -> Tensor:
        """(B, L) part id of each input token (what a router sees)."""
        return self.part_ids[:, :-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=non_blocking) for t in (self.tokens, self.part_ids, self.book_ids, self.starts))
        )


class TokenDataset:
    """Windows of ``block_size + 1`` tokens over a `TokenStream`."""

    def __init__(self, stream: TokenStream, block_size: int) -> None:
        _check_int("TokenDataset", "block_size", block_size, 1)
        if len(stream) < block_size + 1:
            raise ValueError(
                f"TokenDataset: stream has {len(stream)} tokens, fewer than block_size + 1 = {block_size + 1}"
            )
        self.stream, self.block_size = stream, block_size
        self._offsets = torch.arange(block_size + 1)  # (L+1,)

    def __len__(self) -> int:
        """Windows with stride L starting at 0 (targets do not overlap)."""
        return (len(self.stream) - 1) // self.block_size

    def windows(self, starts: Tensor) -> Batch:
        """(B,) start offsets -> a `Batch` of (B, L+1) windows."""
        starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1)  # (B,)
        if starts.numel() and (int(starts.min()) < 0 or int(starts.max()) + self.block_size >= len(self.stream)):
            raise ValueError(f"window starts must lie in [0, {len(self.stream) - self.block_size - 1}]")
        idx = starts[:, None] + self._offsets[None, :]  # (B, L+1)
        s = self.stream
        return Batch(s.ids[idx].long(), s.part_ids[idx].long(), s.book_ids[idx].long(), starts)


@dataclass(frozen=True)
class BatchConfig:
    """Training batches: B = ``batch_size`` windows of L = ``block_size`` inputs, data order from ``seed``."""

    batch_size: int = 16
    block_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("BatchConfig", "batch_size", self.batch_size, 1)
        _check_int("BatchConfig", "block_size", self.block_size, 1)
        _check_int("BatchConfig", "seed", self.seed, 0)


class BatchSampler:
    """Seeded training batches: ``batch(step)`` depends only on (stream, config, step)."""

    def __init__(self, stream: TokenStream, config: BatchConfig | None = None) -> None:
        self.config = config or BatchConfig()
        self.dataset = TokenDataset(stream, self.config.block_size)
        L, n = self.config.block_size, len(stream)
        # W windows per epoch; one fewer than fit at offset 0 leaves >= L tokens of slack, so each epoch can
        # shift its window grid by 0..L-1 tokens (while every window stays inside the stream).
        self.windows_per_epoch = max(1, (n - 1) // L - 1)
        self._max_shift = min(L - 1, n - 1 - self.windows_per_epoch * L)
        self._epoch_cache: dict[int, tuple[np.ndarray, int]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        """(W,) window permutation and shift of an epoch, from SeedSequence([seed, epoch])."""
        if epoch not in self._epoch_cache:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.config.seed, epoch])))
            perm = rng.permutation(self.windows_per_epoch)
            shift = int(rng.integers(0, self._max_shift + 1))
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(next(iter(self._epoch_cache)))
            self._epoch_cache[epoch] = (perm, shift)
        return self._epoch_cache[epoch]

    def starts(self, step: int) -> Tensor:
        """(B,) stream offsets of the windows of ``step``."""
        _check_int("BatchSampler", "step", step, 0)
        B, L, W = self.config.batch_size, self.config.block_size, self.windows_per_epoch
        out = np.empty(B, dtype=np.int64)
        for b in range(B):
            epoch, pos = divmod(step * B + b, W)
            perm, shift = self._epoch(epoch)
            out[b] = shift + int(perm[pos]) * L
        return torch.from_numpy(out)

    def batch(self, step: int) -> Batch:
        """The training batch of ``step`` (tokens (B, L+1))."""
        return self.dataset.windows(self.starts(step))

    def epoch_of(self, step: int) -> float:
        """Epochs completed by the end of ``step``."""
        return (step + 1) * self.config.batch_size / self.windows_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Endless batches from ``start_step`` on (resume by passing the next step)."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


def validation_batches(
    stream: TokenStream, batch_size: int, block_size: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """Deterministic evaluation windows: starts 0, L, 2L, ... in order, so each target token is scored once.

    The last batch may hold fewer than ``batch_size`` windows; ``max_batches`` caps the count.
    """
    _check_int("validation_batches", "batch_size", batch_size, 1)
    if max_batches is not None:
        _check_int("validation_batches", "max_batches", max_batches, 1)
    dataset = TokenDataset(stream, block_size)
    starts = torch.arange(len(dataset)) * block_size  # (W,)
    for k, i in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and k >= max_batches:
            return
        yield dataset.windows(starts[i : i + batch_size])


def num_validation_batches(stream: TokenStream, batch_size: int, block_size: int) -> int:
    """How many batches `validation_batches` yields without ``max_batches``."""
    n = TokenDataset(stream, block_size).__len__()
    return -(-n // batch_size)
