"""Hecto and TabMoE benches: tiny runs end to end (experiment, tables, JSON) and the shape of their results."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from moekit.bench.hecto import run_hecto_bench
from moekit.bench.tabmoe import run_tabmoe_bench
from moekit.tabular.hecto import MODELS
from moekit.tabular.tabmoe import OPS


def _run(fn, tmp_path_factory, name):
    out = tmp_path_factory.mktemp("bench") / f"{name}.json"
    results_dir = tmp_path_factory.mktemp("results")
    console = Console(file=io.StringIO(), width=150)
    result = fn(json_path=str(out), tiny=True, console=console, results_dir=results_dir)
    return result, out, results_dir, console.file.getvalue()


@pytest.fixture(scope="module")
def hecto(tmp_path_factory):
    return _run(run_hecto_bench, tmp_path_factory, "hecto")


@pytest.fixture(scope="module")
def tabmoe(tmp_path_factory):
    return _run(run_tabmoe_bench, tmp_path_factory, "tabmoe")


def test_hecto_bench(hecto):
    result, out, results_dir, text = hecto
    s = result["summary"]
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(s))
    assert not (results_dir / "hecto.json").exists()  # tiny figures are not the reference
    assert [c["model"] for c in result["cases"]] == list(MODELS)
    for key in ("hecto_accuracy", "all_ffn_accuracy", "all_gru_accuracy", "single_gru_accuracy", "hecto_gru_share"):
        assert 0 <= s[key] <= 1
    assert s["best_model"] in MODELS
    sizes = list(s["params"].values())
    assert max(sizes) / min(sizes) < 1.1  # equal parameters, within rounding of the widths
    routing = result["cases"][0]["routing"]
    assert set(routing["per_part"]) == set(result["parts"])
    assert sum(v["verses"] for v in routing["per_length_tokens"].values()) == result["config"]["test_verses"]
    assert "Hecto gate" in text and out.with_suffix(".png").stat().st_size > 1000


def test_tabmoe_bench(tabmoe):
    result, out, results_dir, text = tabmoe
    s = result["summary"]
    assert json.loads(out.read_text())["name"] == "tabmoe" and not (results_dir / "tabmoe.json").exists()
    assert s["oracle_accuracy"] == 1.0 and s["oracle_held_out_accuracy"] == 1.0  # the parser serves every template
    assert set(s["tabmoe_per_op"]) == set(OPS) and set(s["tabmoe_held_out_per_op"]) == set(OPS)
    assert {(c["system"], c["split"]) for c in result["cases"]} == {
        (sys, split) for sys in ("tabmoe", "oracle", "generalist") for split in ("seen", "held_out")
    }
    for split in ("seen", "held_out"):
        conf = result["routing"][split]["confusion"]
        assert sum(sum(row.values()) for row in conf.values()) == result["config"]["n_test"]
    assert "held-out" in text
