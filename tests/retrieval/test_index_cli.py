"""`moekit index build` / `moekit index query` end to end (hashed embedder: fast, offline)."""

from __future__ import annotations

import json

from retrieval_helpers import topical_docs
from typer.testing import CliRunner

from moekit.cli import app


def _docs_folder(tmp_path):
    folder = tmp_path / "docs"
    for name, text in topical_docs().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


class _Runner(CliRunner):
    """Wide terminal: rich does not wrap messages, so they can be matched."""

    def invoke(self, *args, **kwargs):
        return super().invoke(*args, env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}, **kwargs)


def test_build_then_query(tmp_path):
    runner = _Runner()
    out = tmp_path / "idx"
    res = runner.invoke(
        app, ["index", "build", str(_docs_folder(tmp_path)), "--out", str(out), "--embedder", "hashing"]
    )
    assert res.exit_code == 0, res.output
    assert "24 documents" in res.output and (out / "manifest.json").is_file()
    res = runner.invoke(app, ["index", "query", str(out), "anchor tide harbour sailor", "-k", "3", "-m", "100"])
    assert res.exit_code == 0, res.output
    assert res.output.count("sea/") == 3 and "war/" not in res.output


def test_bad_input_is_a_clear_error(tmp_path):
    runner = _Runner()
    res = runner.invoke(app, ["index", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "idx")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    res = runner.invoke(app, ["index", "build", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "idx")])
    assert res.exit_code == 2 and "not valid UTF-8" in res.output and not (tmp_path / "idx").exists()
    out = tmp_path / "idx2"
    docs = _docs_folder(tmp_path)
    assert runner.invoke(app, ["index", "build", str(docs), "--out", str(out), "--embedder", "hashing"]).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["meta"]["num_chunks"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["index", "query", str(out), "sword"])
    assert res.exit_code == 2 and "checksum" in res.output
    res = runner.invoke(app, ["index", "query", str(out), "sword", "-k", "0"])
    assert res.exit_code == 2
