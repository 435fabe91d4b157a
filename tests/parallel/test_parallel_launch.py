"""The documented torchrun command trains the LM with EP=2 and matches the single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.models import LMConfig
from moekit.parallel.checkpoint import load_checkpoint, read_manifest
from moekit.parallel.launch import TINY_CONFIG, build_model, train_lm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_launch_trains_and_saves(tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "moekit.parallel.launch", "--ep", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
        "--save", str(ckpt), "--log-json", str(log), "--timeout", "60",
    ]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world 2 = dp 1 x ep 2" in proc.stdout

    losses = [r["loss"] for r in json.loads(log.read_text())]
    single = build_model(LMConfig(**TINY_CONFIG), None, seed=0)
    assert losses == pytest.approx(train_lm(single, None, 2, 4, 16), abs=1e-5)

    assert read_manifest(ckpt)["ep_size"] == 2
    fresh = build_model(LMConfig(**TINY_CONFIG), None, seed=1)
    assert load_checkpoint(fresh, ckpt)["step"] == 2
    for name, t in fresh.state_dict().items():
        assert t.equal(single.state_dict()[name]) or (t - single.state_dict()[name]).abs().max() < 1e-4, name
