"""Failure behaviour: a peer that dies or stalls gives a clear DistributedError within the timeout."""

from __future__ import annotations

import time

import pytest
from parallel_workers import peer_dies

from moekit.parallel.spawn import RankFailure, spawn_ranks


def test_dead_peer_raises_clear_error_quickly():
    start = time.monotonic()
    results = spawn_ranks(peer_dies, 2, ("die",), timeout_s=60, pg_timeout_s=20)
    assert results[1] is None  # rank 1 exited mid-run
    assert "failed on rank 0" in results[0]["error"] and "peer rank died" in results[0]["error"]
    assert results[0]["seconds"] < 20  # the closed connection is noticed, not waited out
    assert time.monotonic() - start < 60


def test_stalled_peer_times_out_instead_of_hanging():
    results = spawn_ranks(peer_dies, 2, ("stall",), timeout_s=60, pg_timeout_s=2)
    assert results[1] == {"stalled": True}
    assert results[0]["error"] is not None and "failed on rank 0" in results[0]["error"]
    assert results[0]["seconds"] < 5.5  # pg timeout 2 s (+ slack on a loaded machine); rank 1 sleeps 6 s


def _raises(rank: int, world: int) -> dict:
    if rank == 1:
        raise ValueError("boom on rank 1")
    return {"ok": True}


def test_spawn_reports_the_failing_rank():
    with pytest.raises(RankFailure, match="boom on rank 1"):
        spawn_ranks(_raises, 2, timeout_s=30)
