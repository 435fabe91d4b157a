"""Bad data: clear errors naming the file, nothing half-written in the output folder."""

from __future__ import annotations

import pytest

from moekit.training.config import DataConfig, TrainConfig
from moekit.training.prepare import prepare_data

TRAIN = TrainConfig(batch_size=2, block_size=8)


def _no_output(out):
    return not out.exists() or not any(out.iterdir())


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="empty.txt.*no text"):
        prepare_data(DataConfig(source=str(tmp_path / "empty.txt"), vocab_size=300), TRAIN, out)
    assert _no_output(out)


def test_non_utf8_data_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 50)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="latin1.txt.*not valid UTF-8"):
        prepare_data(DataConfig(source=str(tmp_path / "latin1.txt"), vocab_size=300), TRAIN, out)
    assert _no_output(out)


def test_missing_data_path(tmp_path):
    with pytest.raises(ValueError, match="nope.txt.*does not exist"):
        prepare_data(DataConfig(source=str(tmp_path / "nope.txt")), TRAIN, tmp_path / "out")


def test_too_little_text_for_the_block_size(tmp_path):
    (tmp_path / "small.txt").write_text("in the beginning\n" * 30)
    out = tmp_path / "out"
    cfg = DataConfig(source=str(tmp_path / "small.txt"), vocab_size=300, lines_per_chapter=10, val_every=3)
    with pytest.raises(ValueError, match="validation split of .*small.txt.*TrainConfig.block_size=64"):
        prepare_data(cfg, TrainConfig(block_size=64), out)
    assert _no_output(out)  # the tokenizer is not saved for data that cannot be used


def test_plain_text_folder_works(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    cfg = DataConfig(source=str(tmp_path / "docs"), vocab_size=300, lines_per_chapter=10, val_every=2)
    data = prepare_data(cfg, TRAIN, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    batch = data.sampler.batch(0)
    assert batch.inputs.shape == (2, 8) and data.val_batches and data.part_names == ()
    again = prepare_data(cfg, TRAIN, tmp_path / "out")  # reuses the saved tokenizer
    assert again.tokenizer.vocab_size == data.tokenizer.vocab_size


def test_folder_without_text_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="docs.*holds no text files"):
        prepare_data(DataConfig(source=str(tmp_path / "docs"), vocab_size=300), TRAIN, out)
    assert _no_output(out)


def test_non_utf8_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "good.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    (tmp_path / "docs" / "bad.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="bad.txt.*not valid UTF-8"):
        prepare_data(DataConfig(source=str(tmp_path / "docs"), vocab_size=300), TRAIN, out)
    assert _no_output(out)
