"""Shared bench helpers: timing bookkeeping, interleaving, threads, table, atomic JSON with a repo copy."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from moekit.bench.common import (
    TimingConfig,
    environment,
    num_threads,
    print_table,
    time_callable,
    time_interleaved,
    write_result,
)

RESULT = {"summary": {"x": 1}, "cases": [], "environment": {}}


def test_time_callable_counts_calls():
    calls = []
    t = time_callable(lambda: calls.append(1), TimingConfig(warmup=2, repeats=3))
    assert len(calls) == 5 and len(t.times_ms) == 3
    assert t.min_ms <= t.median_ms
    assert set(t.to_dict()) == {"median_ms", "min_ms", "times_ms"}


def test_interleaved_round_robin_and_failures():
    order = []

    def boom():
        raise RuntimeError("no kernel")

    m = time_interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b"), "bad": boom},
        TimingConfig(warmup=0, repeats=2),
    )
    assert order == ["a", "b", "b", "a"]  # each round runs every candidate once, starting point rotates
    assert set(m.timings) == {"a", "b"} and "no kernel" in m.failed["bad"]


def test_threads_are_set_and_restored():
    before = torch.get_num_threads()
    seen = []
    time_callable(lambda: seen.append(torch.get_num_threads()), TimingConfig(warmup=0, repeats=1, threads=1))
    assert seen == [1] and torch.get_num_threads() == before
    with num_threads(None) as n:
        assert n == before
    with pytest.raises(ValueError):
        TimingConfig(threads=0)


def test_environment_keys():
    env = environment()
    assert {"torch_version", "torch_threads", "cpu_model", "date", "cpu_count"} <= env.keys()


def test_print_table():
    buf = io.StringIO()
    print_table("T", ["name", "ms"], [["a", 1.5], ["b", None]], Console(file=buf, width=80))
    text = buf.getvalue()
    assert "T" in text and "1.50" in text and "-" in text


def test_write_result_json_and_repo_copy(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.chdir(repo)
    report = write_result("demo", RESULT, json_path=tmp_path / "out" / "demo.json")
    assert [p.name for p in report.paths] == ["demo.json", "demo.json"] and not report.notes
    for path in report.paths:
        assert json.loads(path.read_text()) == RESULT
    assert (repo / "benchmarks" / "results" / "demo.json").exists()
    assert not list((repo / "benchmarks" / "results").glob("*.tmp"))


def test_write_result_without_results_folder_notes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = write_result("demo", RESULT)
    assert report.paths == () and "benchmarks" in report.notes[0]
    report = write_result("demo", RESULT, repo_copy=False, json_path=tmp_path / "a.json")
    assert len(report.paths) == 1 and report.notes


def test_write_result_needs_the_three_sections(tmp_path):
    with pytest.raises(ValueError, match="environment"):
        write_result("demo", {"summary": {}, "cases": []}, json_path=tmp_path / "x.json")
