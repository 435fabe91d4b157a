"""Tiny LM configs shared by the model tests (d_model 32, 2 layers, vocab 64)."""

from __future__ import annotations

import pytest

from moekit.models import LMConfig

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_experts=4, k=2, max_seq_len=32)


@pytest.fixture
def make_config():
    """``make_config(**overrides) -> LMConfig`` for a tiny model."""

    def make(**kw) -> LMConfig:
        return LMConfig(**{**TINY, **kw})

    return make
