"""The retrieval benchmark at micro size: structure of the JSON, the plot, metric helpers (never speed)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from moekit.bench.retrieval import (
    GOALS,
    RetrievalBenchConfig,
    interpolate_recall,
    known_item_queries,
    mrr_at,
    recall_at,
    run_retrieval_bench,
    synthetic_vectors,
)

MICRO = RetrievalBenchConfig(
    kjv_passages=150,
    kjv_queries=15,
    embedder="hashing",
    synthetic_sizes=(1500,),
    synthetic_queries=20,
    m_sweep=(1, 4, 1000),
    p_sweep=(0.5,),
    nprobe_sweep=(1, 4),
    ef_sweep=(16,),
    fit_sample=1000,
    router_epochs=1,
    repeats=1,
    experiments="none",  # the ExpertRAG / RoMA experiments have their own tests
)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "results").mkdir()
    buf = io.StringIO()
    result = run_retrieval_bench(
        json_path=tmp / "out.json",
        console=Console(file=buf, width=200),
        results_dir=tmp / "results",
        config=MICRO,
    )
    return result, tmp, buf.getvalue()


def test_result_structure_and_files(micro_run):
    result, tmp, printed = micro_run
    data = json.loads((tmp / "out.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert (tmp / "results" / "retrieval.json").is_file()
    assert (tmp / "out.png").read_bytes()[:4] == b"\x89PNG" and (tmp / "results" / "retrieval.png").is_file()
    s = data["summary"]
    for key in ("recall_at_10", "fraction_scanned", "recall_minus_ivf_at_equal_scan", "goal_met", "datasets"):
        assert key in s
    assert s["goals"] == GOALS and set(s["datasets"]) == {"kjv", "synthetic-1k"}
    assert "kjv" in printed and "summary" in printed
    kjv = next(c for c in data["cases"] if c["name"] == "kjv")
    assert {"mrr_at_10", "exact_mrr_at_10"} <= kjv["summary"].keys()
    assert {"exact", "document_experts", "ivf", "hnsw"} <= kjv["build_seconds"].keys()


def test_rows_are_consistent(micro_run):
    result, _, _ = micro_run
    for case in result["cases"]:
        rows = case["rows"]
        assert {r["method"] for r in rows} == {"exact", "mode_centroid", "mode_router", "ivf", "hnsw"}
        exact = rows[0]
        assert exact["recall_at_10"] == 1.0 and exact["fraction_scanned"] == 1.0
        cen = [r for r in rows if r["method"] == "mode_centroid"]
        scans = [r["fraction_scanned"] for r in cen]
        assert scans == sorted(scans)
        full = [r for r in cen if r["fraction_scanned"] == 1.0]
        assert full and full[0]["recall_at_10"] == 1.0  # probing every expert is exact search
        for r in rows:
            assert 0 <= r["recall_at_1"] <= 1 and 0 < r["fraction_scanned"] <= 1 and r["ms_per_query"] >= 0


def test_metric_helpers():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at(np.array([[1, 9, 3], [6, 5, 4]]), truth, 3) == pytest.approx(5 / 6)
    assert recall_at(np.array([[1, 9, 3], [6, 5, 4]]), truth, 1) == pytest.approx(0.5)
    assert mrr_at(np.array([[7, 1, 2], [3, 4, 5]]), np.array([1, 9]), 3) == pytest.approx(0.25)
    # Ties with the k-th exact score count as found (any tie-break is an exact answer); a lower score does not.
    truth_scores = np.array([[0.9, 0.5, 0.5], [0.9, 0.8, 0.7]])
    ids = np.array([[1, 2, 8], [4, 5, 9]])
    assert recall_at(ids, truth, 3, np.array([[0.9, 0.5, 0.5], [0.9, 0.8, 0.6]]), truth_scores) == pytest.approx(5 / 6)
    curve = [(0.1, 0.5), (0.2, 0.7)]
    assert interpolate_recall(curve, 0.15) == (pytest.approx(0.6), True)
    assert interpolate_recall(curve, 0.5) == (0.7, False)


def test_data_generators():
    rng = np.random.default_rng(0)
    passages = ["In the beginning God created the heaven and the earth. And the earth was without form."] * 3
    queries, src = known_item_queries(passages, 2, rng)
    assert len(queries) == 2 and all(len(q.split()) >= 3 for q in queries)
    assert all(set(q.split()) <= set(passages[0].split()) for q in queries)
    X, Q, comp, qcomp = synthetic_vectors(500, 7, 8, 1.0, 0)
    assert X.shape == (500, 8) and Q.shape == (7, 8) and comp.shape == (500,) and qcomp.shape == (7,)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
