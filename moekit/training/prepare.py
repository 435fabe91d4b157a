"""Corpus -> tokenizer -> token streams -> seeded training batches and fixed validation batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.training.config import DataConfig, TrainConfig

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class PreparedData:
    """Everything a run needs from the data side."""

    tokenizer: object  # moekit.data.BPETokenizer
    train_stream: object  # moekit.data.TokenStream
    val_stream: object
    sampler: object  # moekit.data.BatchSampler: batch(i) is a pure function of (seed, i)
    val_batches: list  # list[moekit.data.Batch], the first `eval_batches` validation windows
    part_names: tuple[str, ...]
    source: str

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)


def load_corpus(config: DataConfig):  # noqa: ANN201
    """The bundled KJV (``source="kjv"``) or a UTF-8 text file / folder (errors name the path)."""
    from moekit.data import load_kjv, load_text

    if config.source == "kjv":
        corpus = load_kjv()
    else:
        corpus = load_text(config.source, lines_per_chapter=config.lines_per_chapter)
    if config.chapter_stride > 1:
        chapters = corpus.chapters()[:: config.chapter_stride]
        corpus = corpus.select_chapters(chapters, f"{corpus.name}[::{config.chapter_stride}]")
    return corpus


def spread_validation_batches(stream: Any, batch_size: int, block_size: int, max_batches: int) -> list:
    """Up to ``max_batches`` batches of non-overlapping windows spread evenly over the whole stream (every
    part of the corpus is scored, not just its beginning); all windows when they fit. Deterministic."""
    import torch

    from moekit.data import TokenDataset

    dataset = TokenDataset(stream, block_size)
    n = len(dataset)  # windows at 0, L, 2L, ...
    want = min(n, batch_size * max_batches)
    picks = torch.linspace(0, n - 1, want).round().long().unique()  # (want,) increasing window indices
    starts = picks * block_size  # (want,) stream offsets
    return [dataset.windows(starts[i : i + batch_size]) for i in range(0, len(starts), batch_size)]


def prepare_data(
    data: DataConfig, train: TrainConfig, out_dir: str | Path | None = None, tokenizer_path: str | None = None
) -> PreparedData:
    """Load and split the corpus, get a tokenizer, encode both splits, build the batch sampler.

    The tokenizer is, in order: ``tokenizer_path`` / ``data.tokenizer`` if given; ``out_dir/tokenizer.json``
    if it exists (a resumed run must reuse its vocabulary); else a BPE of ``data.vocab_size`` trained on the
    training split and saved to ``out_dir/tokenizer.json``.
    """
    from moekit.data import (
        BatchConfig,
        BatchSampler,
        BPETokenizer,
        SplitConfig,
        TokenizerConfig,
        TokenStream,
    )

    corpus = load_corpus(data)
    train_corpus, val_corpus = corpus.split(SplitConfig(every=data.val_every))
    given = tokenizer_path or data.tokenizer
    saved = Path(out_dir) / TOKENIZER_FILE if out_dir is not None else None
    if given is not None:
        tokenizer = BPETokenizer.load(given)
    elif saved is not None and saved.is_file():
        tokenizer = BPETokenizer.load(saved)
    else:
        tokenizer = BPETokenizer.train(train_corpus, TokenizerConfig(vocab_size=data.vocab_size))
    save_tokenizer = given is None and saved is not None and not saved.is_file()
    train_stream = TokenStream.from_corpus(train_corpus, tokenizer)
    val_stream = TokenStream.from_corpus(val_corpus, tokenizer)
    for label, stream in (("training", train_stream), ("validation", val_stream)):
        if len(stream) < train.block_size + 2:
            raise ValueError(
                f"the {label} split of {data.source!r} has {len(stream)} tokens, too few for "
                f"TrainConfig.block_size={train.block_size} (need at least {train.block_size + 2})"
            )
    if save_tokenizer:  # only once the data is known to be usable: nothing half-made on disk otherwise
        tokenizer.save(saved.parent)
    sampler = BatchSampler(
        train_stream, BatchConfig(batch_size=train.batch_size, block_size=train.block_size, seed=train.seed)
    )
    val = spread_validation_batches(val_stream, train.batch_size, train.block_size, train.eval_batches)
    return PreparedData(
        tokenizer=tokenizer,
        train_stream=train_stream,
        val_stream=val_stream,
        sampler=sampler,
        val_batches=val,
        part_names=tuple(corpus.part_names),
        source=data.source,
    )
