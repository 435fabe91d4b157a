from __future__ import annotations

from pathlib import Path

import pytest

from moekit.data import EOT, BPETokenizer, Corpus, TokenizerConfig


def test_round_trip_exact(small_tokenizer: BPETokenizer, kjv: Corpus) -> None:
    tok = small_tokenizer
    samples = [
        kjv.verses[1000].text,
        kjv.verses[-1].text,  # Revelation: not in the training text
        "  leading spaces, tabs\tand\r\nCRLF \n\n trailing  ",
        "Unicode: café, naïve, 日本語, emoji 😀, zero-width \u200b.",
        f"two documents{EOT}joined",
        "",
    ]
    for s in samples:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    assert tok.encode(f"a{EOT}b").count(tok.eot_id) == 1
    assert tok.encode_batch(samples[:2]) == [tok.encode(samples[0]), tok.encode(samples[1])]


def test_vocab_and_special(small_tokenizer: BPETokenizer) -> None:
    tok = small_tokenizer
    assert tok.vocab_size == 512
    assert tok.eot_id == 0 and tok.id_to_token(0) == EOT and tok.is_special(0)
    assert not tok.is_special(300)
    assert len(tok.pieces()) == 512
    # BPE learned real merges: common words are single tokens
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" LORD")) <= 2


def test_save_load(small_tokenizer: BPETokenizer, tmp_path: Path) -> None:
    path = small_tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json" and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name != "tokenizer.json"]  # no temp files left
    loaded = BPETokenizer.load(tmp_path / "tok")
    text = "And God said, Let there be light: and there was light."
    assert loaded.encode(text) == small_tokenizer.encode(text)
    assert loaded.vocab_size == small_tokenizer.vocab_size and loaded.eot_id == small_tokenizer.eot_id
    assert BPETokenizer.load(path).encode(text) == small_tokenizer.encode(text)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        BPETokenizer.load(tmp_path)


def test_train_errors_and_config() -> None:
    with pytest.raises(ValueError, match="empty"):
        BPETokenizer.train([])
    with pytest.raises(ValueError, match="TokenizerConfig.vocab_size"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(ValueError, match="TokenizerConfig.min_frequency"):
        TokenizerConfig(min_frequency=0)
    with pytest.raises(ValueError, match="TokenizerConfig.special_tokens"):
        TokenizerConfig(special_tokens=())


def test_full_kjv_training(kjv: Corpus) -> None:
    tok = BPETokenizer.train(kjv)  # a Corpus trains on its verse texts
    assert tok.vocab_size == 2048
    assert tok.decode(tok.encode(kjv.verses[5000].text)) == kjv.verses[5000].text
