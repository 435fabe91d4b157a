"""Layer bench in its tiny mode: JSON structure, printed tables, candidate agreement (never speed)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from moekit.bench.common import TimingConfig
from moekit.bench.layer import (
    GOALS,
    LayerBenchConfig,
    LayerCase,
    NaiveLoopMoE,
    check_agreement,
    full_cases,
    quick_cases,
    run_layer_bench,
    tiny_cases,
)

SUMMARY_KEYS = {
    "time_vs_dense",
    "speedup_vs_hf_best",
    "speedup_vs_loop",
    "best_backend",
    "goals",
    "outputs_agree",
    "max_abs_diff",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run shared by the tests below: (result, json file, printed text)."""
    tmp = tmp_path_factory.mktemp("bench")
    buf = io.StringIO()
    out = tmp / "layer.json"
    results_dir = tmp / "results"
    results_dir.mkdir()
    result = run_layer_bench(tiny=True, json_path=out, console=Console(file=buf, width=200), results_dir=results_dir)
    return result, out, buf.getvalue()


def test_json_has_summary_cases_environment(tiny_run):
    result, path, _ = tiny_run
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    assert {"summary", "cases", "environment"} <= data.keys()
    assert SUMMARY_KEYS <= data["summary"].keys()
    assert set(data["summary"]["goals"]) == set(GOALS)
    assert data["summary"]["best_backend"] in ("grouped_mm", "bmm", "loop")
    env = data["environment"]
    assert {"torch_version", "torch_threads", "cpu_model", "date"} <= env.keys()
    assert [c["case"]["name"] for c in data["cases"]] == [c.name for c in tiny_cases()]


def test_every_kind_of_candidate_is_timed(tiny_run):
    result, _, _ = tiny_run
    for case in result["cases"]:
        names = {c["name"] for c in case["candidates"]}
        assert {"dense", "naive_loop", "moekit/grouped_mm", "moekit/bmm", "moekit/loop"} <= names
        assert {"hf_mixtral/eager", "hf_qwen3/eager"} <= names  # transformers is a dev dependency
        for cand in case["candidates"]:
            assert cand["median_ms"] > 0 and cand["min_ms"] <= cand["median_ms"]
            slow = cand["name"] == "naive_loop" or cand["name"].endswith("/eager")  # per-expert Python loops
            want = result["config"]["slow_repeats"] if slow else result["config"]["repeats"]
            assert len(cand["times_ms"]) == want, cand["name"]
        for why in case["skipped"].values():
            assert why  # every skipped candidate says why


def test_all_candidates_agree(tiny_run):
    result, _, _ = tiny_run
    assert result["summary"]["outputs_agree"] is True
    for case in result["cases"]:
        for cand in case["candidates"]:
            if cand["kind"] == "dense":
                continue
            assert cand["rel_diff"] <= case["rtol"], cand["name"]
            if case["case"]["dtype"] == "fp32":
                assert cand["routing_mismatch_share"] == 0.0, cand["name"]


def test_table_printed(tiny_run):
    _, _, text = tiny_run
    assert "ms per forward+backward" in text
    for name in ("dense", "naive_loop", "moekit/grouped_mm", "hf_qwen3/eager", "time_vs_dense"):
        assert name in text


def test_tiny_run_not_copied_to_results(tiny_run):
    result, path, text = tiny_run
    assert result["mode"] == "tiny"
    assert list((path.parent / "results").iterdir()) == []  # tiny figures never replace the reference file
    assert "not written" in text
    assert not list(path.parent.glob("*.tmp"))


def test_agreement_check_catches_a_wrong_candidate():
    from moekit.bench.layer import Candidate

    torch.manual_seed(0)
    E, D, F, k = 4, 8, 16, 2
    ref = NaiveLoopMoE(torch.randn(E, D), torch.randn(E, 2 * F, D), torch.randn(E, D, F), k)
    x = torch.randn(10, D)
    wrong = Candidate("wrong", "moekit", lambda t: ref(t) + 1.0)
    with pytest.raises(AssertionError, match="wrong"):
        check_agreement([wrong], ref, x, rtol=1e-3)
    right = Candidate("right", "moekit", ref)
    diffs, failed = check_agreement([right], ref, x, rtol=1e-3)
    assert diffs["right"]["max_abs_diff"] == 0.0 and not failed


def test_case_sets():
    full = full_cases()
    assert full[0] == LayerCase(tokens=4096, d_model=512, d_ff=1024, num_experts=64, k=2, dtype="fp32")
    (quick,) = quick_cases()  # the headline's E, k, dtype and tokens (pairs per expert), at half the widths
    assert (quick.num_experts, quick.k, quick.dtype, quick.tokens) == (64, 2, "fp32", 4096)
    assert quick.d_model * quick.d_ff < full[0].d_model * full[0].d_ff
    assert len(full) == len(set(full)) == 8
    assert {(c.num_experts, c.k, c.dtype) for c in full} == {
        (e, k, d) for e in (8, 64) for k in (2, 8) for d in ("fp32", "bf16")
    }


def test_bad_config():
    with pytest.raises(ValueError, match="router"):
        LayerBenchConfig(router="hash")
    with pytest.raises(ValueError, match="backends"):
        LayerBenchConfig(backends=("cuda_magic",))
    with pytest.raises(ValueError, match="dtype"):
        LayerCase(dtype="fp8")
    with pytest.raises(ValueError, match="slow_repeats"):
        LayerBenchConfig(slow_repeats=0)
    with pytest.raises(ValueError, match="clock"):
        TimingConfig(clock="gpu")


def test_hf_impls_and_cpu_clock(tmp_path):
    """A custom run timing only HF grouped_mm, in CPU time: the others are listed as skipped, with why."""
    small = tiny_cases()[0]
    cfg = LayerBenchConfig(
        backends=("loop",), hf_impls=("grouped_mm",), timing=TimingConfig(0, 1, threads=1, clock="cpu")
    )
    result = run_layer_bench(cases=[small], config=cfg, console=Console(file=io.StringIO()), results_dir=tmp_path)
    (case,) = result["cases"]
    names = {c["name"] for c in case["candidates"]}
    assert {"hf_mixtral/grouped_mm", "hf_qwen3/grouped_mm", "moekit/loop"} <= names
    assert not any(n.endswith("/eager") for n in names)
    assert "hf_mixtral/eager" in case["skipped"] and case["clock"] == "cpu"
    assert result["config"]["clock"] == "cpu" and result["config"]["hf_impls"] == ["grouped_mm"]
    assert list(tmp_path.iterdir()) == []  # a custom-case run is not the reference file
