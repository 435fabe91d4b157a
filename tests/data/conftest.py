"""Shared fixtures for the data-layer tests: the KJV is loaded once, a tokenizer trained once per session."""

from __future__ import annotations

import pytest

from moekit.data import BPETokenizer, Corpus, TokenizerConfig, load_kjv


@pytest.fixture(scope="session")
def kjv() -> Corpus:
    return load_kjv()


@pytest.fixture(scope="session")
def small_tokenizer(kjv: Corpus) -> BPETokenizer:
    """Trained on Genesis only (about 5% of the Bible): fast, still a real BPE."""
    genesis = [v.text for v in kjv if v.book == "Genesis"]
    return BPETokenizer.train(genesis, TokenizerConfig(vocab_size=512))
