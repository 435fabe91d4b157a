from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moekit.data import (
    PART_NAMES,
    BatchConfig,
    BatchSampler,
    BPETokenizer,
    Corpus,
    TokenDataset,
    TokenStream,
    num_validation_batches,
    validation_batches,
)


@pytest.fixture(scope="module")
def stream() -> TokenStream:
    return TokenStream.from_ids(torch.arange(1000) % 97)


def test_batch_pure_function_of_seed_and_step(stream: TokenStream) -> None:
    cfg = BatchConfig(batch_size=4, block_size=16, seed=3)
    a, b = BatchSampler(stream, cfg), BatchSampler(stream, cfg)
    # b is queried out of order (a "resumed" run): same batches anyway
    for step in (7, 0, 123, 7):
        assert torch.equal(a.batch(step).tokens, b.batch(step).tokens)
    assert a.batch(0).tokens.shape == (4, 17)
    assert not torch.equal(a.batch(0).starts, a.batch(1).starts)
    other = BatchSampler(stream, BatchConfig(batch_size=4, block_size=16, seed=4))
    assert not torch.equal(a.batch(0).starts, other.batch(0).starts)
    resumed = next(b.iterate(start_step=5))
    assert torch.equal(resumed.tokens, a.batch(5).tokens)


def test_windows_are_contiguous_and_shifted(stream: TokenStream) -> None:
    batch = BatchSampler(stream, BatchConfig(batch_size=3, block_size=8)).batch(2)
    for row, start in zip(batch.tokens, batch.starts, strict=True):
        assert torch.equal(row, stream.ids[start : start + 9].long())
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert batch.inputs.shape == batch.targets.shape == (3, 8)


def test_epoch_covers_every_window_once(stream: TokenStream) -> None:
    sampler = BatchSampler(stream, BatchConfig(batch_size=7, block_size=10, seed=0))
    W, L = sampler.windows_per_epoch, 10
    assert W == (1000 - 1) // L - 1 and W % 7 == 0  # 98 windows: epoch 0 is exactly steps 0..13
    starts = torch.cat([sampler.starts(s) for s in range(W // 7)])
    shift = int(starts.min())
    assert 0 <= shift < L
    assert sorted(((starts - shift) // L).tolist()) == list(range(W))
    assert int(starts.max()) + L + 1 <= len(stream)
    assert not torch.equal(starts, torch.cat([sampler.starts(s) for s in range(W // 7, 2 * W // 7)]))


def test_validation_batches_deterministic(stream: TokenStream) -> None:
    batches = list(validation_batches(stream, batch_size=8, block_size=16))
    assert len(batches) == num_validation_batches(stream, 8, 16) == -(-((1000 - 1) // 16) // 8)
    starts = torch.cat([b.starts for b in batches])
    assert torch.equal(starts, torch.arange(len(starts)) * 16)
    again = list(validation_batches(stream, batch_size=8, block_size=16))
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(batches, again, strict=True))
    assert len(list(validation_batches(stream, 8, 16, max_batches=2))) == 2


def test_stream_from_corpus_aligns_parts(kjv: Corpus, small_tokenizer: BPETokenizer) -> None:
    books = {"Ruth", "Jonah", "Jude"}
    sub = kjv.select_chapters(k for k in kjv.chapters() if kjv.books[k[0]] in books)
    s = TokenStream.from_corpus(sub, small_tokenizer)
    assert s.part_names == PART_NAMES and len(s) == len(s.part_ids) == len(s.book_ids)
    eot = (s.ids == small_tokenizer.eot_id).nonzero().flatten()
    assert len(eot) == 3 and int(eot[-1]) == len(s) - 1  # one end-of-text per book
    # decoding each book's tokens gives back its verses; every token (end-of-text included) carries its part
    expected_part = {"Ruth": "history", "Jonah": "prophets", "Jude": "epistles"}
    start = 0
    for end in eot.tolist():
        book = kjv.books[int(s.book_ids[start])]
        assert small_tokenizer.decode(s.ids[start:end].tolist()) == "".join(
            v.text + "\n" for v in sub if v.book == book
        )
        assert set(s.part_ids[start : end + 1].tolist()) == {PART_NAMES.index(expected_part[book])}
        assert set(s.book_ids[start : end + 1].tolist()) == {kjv.books.index(book)}
        start = end + 1
    counts = s.part_counts()
    assert {p for p, n in counts.items() if n} == {"history", "prophets", "epistles"}
    assert sum(counts.values()) == len(s)
    batch = BatchSampler(s, BatchConfig(batch_size=2, block_size=32)).batch(0)
    assert batch.part_ids.shape == batch.tokens.shape and batch.target_part_ids.shape == (2, 32)


def test_stream_save_load(stream: TokenStream, tmp_path: Path) -> None:
    path = stream.save(tmp_path / "s.safetensors")
    loaded = TokenStream.load(path)
    assert torch.equal(loaded.ids, stream.ids) and torch.equal(loaded.part_ids, stream.part_ids)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        TokenStream.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        TokenStream.load(tmp_path / "nope.safetensors")


def test_errors(stream: TokenStream) -> None:
    with pytest.raises(ValueError, match="BatchConfig.batch_size"):
        BatchConfig(batch_size=0)
    with pytest.raises(ValueError, match="BatchConfig.seed"):
        BatchConfig(seed=-1)
    with pytest.raises(ValueError, match="block_size"):
        TokenDataset(TokenStream.from_ids([1, 2, 3]), block_size=3)
    with pytest.raises(ValueError, match="step"):
        BatchSampler(stream).batch(-1)
    with pytest.raises(ValueError, match="TokenStream.ids is empty"):
        TokenStream.from_ids([])
    with pytest.raises(ValueError, match="TokenStream.part_ids"):
        TokenStream(
            torch.zeros(3, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int8),
            torch.zeros(3, dtype=torch.int32),
        )
