"""Tabular benchmark: a tiny run (bundled scikit-learn data, 2 folds, capped rows) and the shape of its result."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

pytest.importorskip("pandas")

from moekit.bench.tabular import MODELS, TINY_DATASETS, run_tabular_bench, summarize  # noqa: E402


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tabular.json"
    results_dir = tmp_path_factory.mktemp("results")
    console = Console(file=io.StringIO(), width=150)
    result = run_tabular_bench(quick=True, json_path=str(out), tiny=True, console=console, results_dir=results_dir)
    return result, out, results_dir, console.file.getvalue()


def test_summary_structure(tiny_result):
    result, _, _, _ = tiny_result
    s = result["summary"]
    assert result["name"] == "tabular" and result["mode"] == "tiny"
    assert s["n_datasets"] == len(TINY_DATASETS)
    assert 0 <= s["datasets_at_or_above_hgb"] <= s["n_datasets"]
    assert 0 <= s["datasets_below_linear"] <= s["n_datasets"]
    assert s["datasets_at_or_above_hgb"] == len(s["at_or_above_hgb"])
    assert s["datasets_below_linear"] == len(s["below_linear"])
    assert s["goal_never_below_linear"] == (s["datasets_below_linear"] == 0)
    assert set(s["scores"]) == set(TINY_DATASETS)
    for scores in s["scores"].values():
        assert scores["metric"] in ("accuracy", "rmse")
        assert set(MODELS) <= set(scores)


def test_cases_use_the_same_folds_for_every_model(tiny_result):
    result, _, _, _ = tiny_result
    tasks = {c["dataset"]: c["task"] for c in result["cases"]}
    assert tasks == {"breast_cancer": "binary", "wine": "multiclass", "diabetes": "regression"}
    for case in result["cases"]:
        assert case["folds"] == 2 and case["rows"] <= 150
        for model in MODELS:
            assert len(case["scores"][model]["folds"]) == 2
        moe = case["scores"]["moe"]
        assert len(moe["expert_share_mean"]) == 4
        if case["metric"] == "accuracy":
            assert all(0.0 <= v <= 1.0 for v in moe["folds"])


def test_json_written_and_repo_copy_skipped(tiny_result):
    result, out, results_dir, printed = tiny_result
    assert json.loads(out.read_text())["summary"] == result["summary"]
    assert not (results_dir / "tabular.json").exists()  # tiny runs are not the reference figures
    assert "moe>=hgb" in printed and "breast_cancer" in printed


def test_summarize_counts_directions():
    def case(name, metric, moe, lin, hgb):
        scores = {m: {"mean": v} for m, v in (("moe", moe), ("linear", lin), ("hist_gb", hgb))}
        lower = metric == "rmse"
        return {
            "dataset": name,
            "metric": metric,
            "scores": scores,
            "moe_at_or_above_hgb": moe <= hgb if lower else moe >= hgb,
            "moe_below_linear": moe > lin if lower else moe < lin,
        }

    s = summarize([case("a", "accuracy", 0.9, 0.8, 0.9), case("b", "rmse", 2.0, 1.0, 3.0)])
    assert s["at_or_above_hgb"] == ["a", "b"] and s["below_linear"] == ["b"]
    assert s["goal_at_or_above_hgb_on_half"] and not s["goal_never_below_linear"]


def test_at_least_as_good_treats_equal_means_as_equal():
    from moekit.bench.tabular import at_least_as_good

    folds = [0.956140350877193, 0.9736842105263158, 0.9824561403508771, 1.0, 0.9823008849557522]
    a, b = sum(folds) / 5, sum(reversed(folds)) / 5  # the same scores, summed in another order
    assert at_least_as_good(a, b, regression=False) and at_least_as_good(b, a, regression=False)
    assert at_least_as_good(0.9, 0.8, regression=False) and not at_least_as_good(0.8, 0.9, regression=False)
    assert at_least_as_good(3.0, 3.5, regression=True) and not at_least_as_good(3.5, 3.0, regression=True)
