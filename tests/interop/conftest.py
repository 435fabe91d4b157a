"""One torch thread for the interop tests: tiny ops, and a shared 2-core machine where idle OpenMP threads
cost more than they give."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
