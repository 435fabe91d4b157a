"""PNG plots (Agg) and a test-sized run of the edge benchmark."""

from __future__ import annotations

import json

from moekit.inference.plots import plot_hit_rate_vs_budget, plot_temporal_locality, reuse_distances

PNG = b"\x89PNG\r\n\x1a\n"


def test_reuse_distances():
    trace = [(0, (1, 2)), (1, (3,)), (0, (1,)), (0, (2,))]
    assert reuse_distances(trace, [1, 1, 2, 5]) == [1, 4]


def test_plots_are_pngs(tmp_path, reference):
    _, rec = reference
    curves = {"lru": [(0.25, 0.4), (0.5, 0.7)], "belady": [(0.25, 0.6), (0.5, 0.9)]}
    a = plot_hit_rate_vs_budget(curves, tmp_path / "hit.png")
    b = plot_temporal_locality(rec.trace, rec.call_steps, 8, tmp_path / "loc.png", layer=1)
    for path in (a, b):
        assert path.read_bytes()[:8] == PNG


def test_edge_bench_tiny(tmp_path):
    from rich.console import Console

    from moekit.bench.edge import EdgeBenchConfig, run_edge_bench

    cfg = EdgeBenchConfig.tiny()
    out = tmp_path / "edge.json"
    result = run_edge_bench(
        json_path=out, config=cfg, plot_dir=tmp_path, console=Console(file=open(tmp_path / "log", "w"))
    )
    saved = json.loads(out.read_text())
    assert saved["mode"] == "custom" and saved["summary"]["identical_outputs"] is True
    s = result["summary"]
    assert s["runtime_matches_replay"] is True
    assert set(s["goals"]) == {"speedup_vs_naive", "fraction_of_full_speed", "hit_rate_gain_vs_lru"}
    # naive + 1 budget x 3 policies x (with, without prefetch), one throttle
    assert len(result["cases"]) == 1 + 3 * 2
    assert all(c["peak_resident_expert_bytes"] <= c["budget_bytes"] for c in result["cases"] if c["cache"] != "naive")
    int8 = result["int8"]
    assert int8["expert_bytes_int8"] < int8["expert_bytes_fp32"] and int8["runtime_matches_dequantized_model"]
    timing = s["per_throttle"][0]["headline_timing"]
    med = timing["tokens_per_s_median"]
    assert s["speedup_ceiling"] == med["resident"] / med["naive"]  # the bound speedup_vs_naive is judged against
    assert s["int8_lru"]["matches_dequantized_model"] is True
    assert s["int8_lru"]["speedup_vs_naive"] == med["int8"] / med["naive"]
    assert result["trained_model"]["int8_quality"]["top1_agreement"] > 0.5
    assert len(result["plots"]) == 2 and all((tmp_path / p).exists() for p in result["plots"])
