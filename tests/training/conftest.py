"""Fixtures of the training tests; helpers live in training_helpers.py."""

from __future__ import annotations

import pytest
import torch
from training_helpers import BLOCK, make_stream

from moekit.data import BatchConfig, BatchSampler, validation_batches


@pytest.fixture(scope="session")
def data():
    """(seeded sampler over a synthetic stream, 2 fixed validation batches)."""
    stream = make_stream()
    val = list(validation_batches(make_stream(600, seed=1), 4, BLOCK, max_batches=2))
    return BatchSampler(stream, BatchConfig(batch_size=4, block_size=BLOCK, seed=0)), val


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a loaded machine makes thread spinning very slow)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
