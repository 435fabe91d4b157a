"""Routing metrics, the JSONL log, and plots."""

from __future__ import annotations

import math

import pytest
import torch
from training_helpers import tiny_model

from moekit.training.metrics import MetricsLogger, read_metrics, routing_metrics, series
from moekit.training.plots import plot_bars, plot_loss_curves, plot_routing_curves

PNG = b"\x89PNG\r\n\x1a\n"


def test_routing_metrics_average_over_layers():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 8))
    out = model(x)
    m = routing_metrics(out.moe_outputs)
    expected_cv = sum(float(o.stats["load_cv"]) for o in out.moe_outputs) / 2
    assert m["load_cv"] == pytest.approx(expected_cv)
    ent = sum(float(o.stats["router_entropy"]) for o in out.moe_outputs) / 2 / math.log(4)
    assert m["router_entropy"] == pytest.approx(ent) and 0 < m["router_entropy"] <= 1
    assert m["experts_per_token"] == 2.0 and m["dropped_share"] == 0.0
    assert {"aux/load_balance", "aux/z_loss"} <= set(m)
    assert routing_metrics([]) == {}


def test_hash_router_has_no_entropy():
    model = tiny_model(router="hash")
    out = model(torch.randint(0, 64, (2, 8)))
    m = routing_metrics(out.moe_outputs)
    assert "router_entropy" not in m and "load_cv" in m


def test_metrics_log_reset_and_truncated_line(tmp_path):
    log = MetricsLogger(tmp_path / "m.jsonl")
    for step in range(1, 5):
        log.log({"step": step, "loss": 1.0 / step, "val_loss": math.nan})
    rows = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["val_loss"] is None  # NaN -> null
    log.reset(keep_before_step=3)
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2]
    with open(log.path, "a") as f:
        f.write('{"step": 3, "lo')  # a writer killed mid-line
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl.*line 2"):
        read_metrics(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="step"):
        log.log({"loss": 1.0})
    assert series([{"step": 1, "a": 2}, {"step": 2}], "a") == ([1], [2])


def test_plots_write_pngs(tmp_path):
    rows = [
        {"step": s, "loss": 5 - s / 10, "wall_time": s * 0.5, "load_cv": 0.1, "router_entropy": 0.9,
         "dropped_share": 0.0, "zero_expert_share": 0.0, **({"val_loss": 5 - s / 9} if s % 5 == 0 else {})}
        for s in range(1, 21)
    ]  # fmt: skip
    for path in (
        plot_loss_curves({"MoE": rows, "dense": rows[:10]}, tmp_path / "loss.png"),
        plot_routing_curves(rows, tmp_path / "routing.png", "t"),
        plot_routing_curves([{"step": 1, "loss": 1.0}], tmp_path / "dense_routing.png"),
        plot_bars(["a", "b"], {"x": [1.0, None], "y": [2, 3]}, tmp_path / "bars.png", "bars"),
    ):
        assert path.read_bytes()[:8] == PNG
