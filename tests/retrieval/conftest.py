"""Fixtures of the retrieval tests: topical documents and a hashed embedder (fast, offline)."""

from __future__ import annotations

import pytest
import torch
from retrieval_helpers import topical_docs

from moekit.retrieval import HashingEmbedder


@pytest.fixture
def embedder():
    return HashingEmbedder(dim=64)


@pytest.fixture
def docs():
    return topical_docs()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-offs (much faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
