"""The moekit CLI through typer's CliRunner: routers, version, bench layer (tiny), option errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moekit import available_routers
from moekit.cli import TINY_ENV, app

runner = CliRunner()


def test_routers_lists_every_router():
    result = runner.invoke(app, ["routers"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in available_routers():
        assert name in result.output


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and "moekit 0.1.0" in result.output


def test_bench_layer_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # never touch the repository's benchmarks/results
    out = tmp_path / "layer.json"
    result = runner.invoke(app, ["bench", "layer", "--tiny", "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["mode"] == "tiny" and data["environment"]["torch_threads"] == 1
    assert {"time_vs_dense", "speedup_vs_hf_best", "speedup_vs_loop"} <= data["summary"].keys()
    assert "ms per forward+backward" in result.output


def test_bench_layer_tiny_via_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(TINY_ENV, "1")
    result = runner.invoke(app, ["bench", "layer", "--json", str(tmp_path / "x.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "x.json").read_text())["mode"] == "tiny"


def test_bad_options_are_clear(tmp_path):
    result = runner.invoke(app, ["bench", "layer", "--tiny", "--threads", "0"])
    assert result.exit_code == 2 and "positive number of threads" in result.output
    result = runner.invoke(app, ["bench", "layer", "--tiny", "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output
    result = runner.invoke(app, ["bench", "layer", "--tiny", "--json", str(tmp_path / "x.txt")])
    assert result.exit_code == 2 and ".json" in result.output
    result = runner.invoke(app, ["bench", "nope"])
    assert result.exit_code == 2


def test_help_lists_groups():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "bench" in result.output and "routers" in result.output


def test_top_level_commands_are_registered() -> None:
    from typer.testing import CliRunner

    from moekit.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("demo", "train", "compare-routers", "convert", "index"):
        assert name in result.output


def test_demo_rejects_non_positive_minutes() -> None:
    from typer.testing import CliRunner

    from moekit.cli import app

    result = CliRunner().invoke(app, ["demo", "--minutes", "0"])
    assert result.exit_code != 0
    assert "--minutes" in result.output


def test_convert_rejects_unknown_target(tmp_path) -> None:
    from typer.testing import CliRunner

    from moekit.cli import app

    result = CliRunner().invoke(app, ["convert", str(tmp_path), str(tmp_path / "out"), "--to", "onnx"])
    assert result.exit_code != 0
    assert "--to" in result.output
