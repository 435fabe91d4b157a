"""The documented command, ``moekit train CONFIG --nproc 2`` (torchrun running ``moekit.parallel.train_lm``),
trains the LM on the bundled corpus with EP=2, matches the single-process trainer and leaves a checkpoint
the single-process trainer resumes (tested in process in test_parallel_train_lm.py)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from moekit.cli import app
from moekit.parallel.train_lm import torchrun_command
from moekit.training.config_file import load_config
from moekit.training.metrics import read_metrics
from moekit.training.prepare import prepare_data
from moekit.training.runs import torch_threads, train_run

TOML = """
[run]
name = "tiny"
out_dir = "{out}"
[data]
vocab_size = 280
chapter_stride = 80
[model]
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 32
num_experts = 4
max_seq_len = 16
[train]
max_steps = 3
batch_size = 4
block_size = 16
warmup_steps = 1
eval_every = 0
eval_batches = 1
"""


def test_torchrun_command_line():
    cmd = torchrun_command("run.toml", 4, out="o", resume=True, ep_size=2)
    assert cmd[:2] == [sys.executable, "-m"] and cmd[2] == "torch.distributed.run"
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[cmd.index("-m", 3) :] == [
        "-m",
        "moekit.parallel.train_lm",
        "run.toml",
        "--out",
        "o",
        "--ep",
        "2",
        "--resume",
    ]
    with pytest.raises(ValueError, match="nproc must be an int >= 1"):
        torchrun_command("run.toml", 0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_moekit_train_nproc_2(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TOML.format(out=tmp_path / "ep2"))
    result = CliRunner().invoke(app, ["train", str(config), "--nproc", "2"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "ep2" / "tiny"
    got = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    summary = json.loads((tmp_path / "ep2" / "summary.json").read_text())
    assert summary["parallel"] == {"world_size": 2, "ep_size": 2, "dp_size": 1}

    cfg = load_config(config)  # the single-process trainer, on the tokenizer the distributed run trained
    data = prepare_data(cfg.data, cfg.train, tmp_path / "ep2")
    with torch_threads(1):
        single = train_run("tiny", cfg.model, cfg.train, data, tmp_path / "single", progress=False)
    assert got == pytest.approx([r["loss"] for r in single.rows], abs=1e-5)
