"""``run_ep_bench`` runs end to end (tiny case, EP 1 and 2) and checks itself against the single process."""

from __future__ import annotations

import io
import json

from rich.console import Console

from moekit.bench.ep import run_ep_bench


def test_ep_bench_tiny(tmp_path):
    out = tmp_path / "ep.json"
    result = run_ep_bench(tiny=True, json_path=str(out), ep_sizes=(1, 2), console=Console(file=io.StringIO()))
    summary = result["summary"]
    assert summary["goal_met"] and summary["max_abs_diff_vs_single"] <= 1e-5
    assert set(summary["tokens_per_s"]) == {"ep1", "ep2"} and all(v > 0 for v in summary["tokens_per_s"].values())
    assert summary["a2a_bytes_per_rank_step"]["ep1"] == 0 < summary["a2a_bytes_per_rank_step"]["ep2"]
    assert json.loads(out.read_text())["name"] == "ep"
    assert not (tmp_path / "benchmarks").exists()
