"""The hf benchmark runs end to end on test-sized models and reports what it promises."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from moekit.bench.hf import BUILDERS, HFCase, full_cases, quick_cases, run_hf_bench  # noqa: E402


def test_tiny_run_writes_a_complete_result(tmp_path) -> None:
    out = tmp_path / "hf.json"
    result = run_hf_bench(tiny=True, json_path=str(out), results_dir=tmp_path / "none")
    assert json.loads(out.read_text())["name"] == "hf"
    summary = result["summary"]
    assert set(summary["speedup_vs_hf_best"]) == {c["case"]["name"] for c in result["cases"]}
    for case in result["cases"]:
        names = {r["name"] for r in case["candidates"]}
        assert "moekit" in names and any(n.startswith("hf/") for n in names)
        assert case["max_abs_logit_diff"] <= 1e-5  # fp32: the patched model computes the same logits
        assert case["patched_blocks"] > 0
    for value in summary["speedup_vs_hf_best"].values():
        assert value > 0


def test_cases_cover_every_family() -> None:
    assert {c.family for c in quick_cases()} == set(BUILDERS)
    assert {c.dtype for c in full_cases()} == {"fp32", "bf16"}
    with pytest.raises(ValueError, match="family"):
        HFCase("gpt2", experts=1, k=1, d_ff=1)
