"""Resume gives the same loss curve as the uninterrupted run; an interrupted checkpoint write (an injected
failure, or SIGKILL of a training subprocess) leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_model, train_config

from moekit.training import checkpoint as ckpt
from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _train_losses(rows):
    return [(r["step"], r["loss"], r["aux_loss"], r["lr"]) for r in rows]


def _val_at(rows, steps):
    return {r["step"]: r["val_loss"] for r in rows if r["step"] in steps and "val_loss" in r}


def _straight(tmp_path, data, router="topk"):
    sampler, val = data
    trainer = Trainer(tiny_model(router=router), train_config(), sampler, val, tmp_path / "straight")
    result = trainer.train()
    return trainer, result, read_metrics(tmp_path / "straight" / "metrics.jsonl")


@pytest.mark.parametrize("router", ["topk", "dynmoe"])
def test_resume_gives_identical_losses(tmp_path, data, router):
    sampler, val = data
    straight, res_a, rows_a = _straight(tmp_path, data, router)
    assert res_a.steps == 6 and len(rows_a) == 6

    out = tmp_path / "split"
    first = Trainer(tiny_model(router=router), train_config(), sampler, val, out)
    res_1 = first.train(max_new_steps=3)
    assert res_1.steps == 3 and res_1.stopped_early
    # A new "process": a differently initialised model and global RNG; everything comes from the checkpoint.
    torch.manual_seed(999)
    second = Trainer(tiny_model(seed=123, router=router), train_config(), sampler, val, out)
    res_b = second.train(resume=True)
    assert res_b.resumed_from == 3 and res_b.steps == 6 and not res_b.stopped_early
    rows_b = read_metrics(out / "metrics.jsonl")
    assert _train_losses(rows_a) == _train_losses(rows_b)  # exactly equal, not approximately
    assert _val_at(rows_a, {2, 4, 6}) == _val_at(rows_b, {2, 4, 6})
    assert res_a.final_val_loss == res_b.final_val_loss
    for (na, pa), (nb, pb) in zip(straight.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na


def test_resume_without_checkpoint_starts_fresh(tmp_path, data):
    sampler, val = data
    trainer = Trainer(tiny_model(), train_config(max_steps=2), sampler, val, tmp_path / "run")
    result = trainer.train(resume=True)
    assert result.resumed_from is None and result.steps == 2


def test_resume_of_other_model_config_is_an_error(tmp_path, data):
    sampler, val = data
    Trainer(tiny_model(), train_config(max_steps=2), sampler, val, tmp_path / "run").train()
    other = Trainer(tiny_model(d_ff=48), train_config(max_steps=4), sampler, val, tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError, match="different model config.*d_ff"):
        other.train(resume=True)


def test_failure_between_temp_write_and_rename_keeps_previous(tmp_path, data, monkeypatch):
    sampler, val = data
    out = tmp_path / "run"
    Trainer(tiny_model(), train_config(), sampler, val, out).train(max_new_steps=3)
    root = out / "checkpoints"
    assert ckpt.latest_checkpoint(root).name == "step_000003"

    def boom(tmp: Path) -> None:
        assert (tmp / ckpt.STATE_FILE).is_file()  # fully written, not yet published
        raise OSError("disk on fire")

    monkeypatch.setattr(ckpt, "_before_publish", boom)
    with pytest.raises(OSError, match="disk on fire"):
        Trainer(tiny_model(), train_config(), sampler, val, out).train(resume=True)
    assert ckpt.latest_checkpoint(root).name == "step_000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003"]  # temp folder cleaned up
    doc = ckpt.load_checkpoint(root, tiny_model())
    assert doc["step"] == 3


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path, data):
    out = tmp_path / "run"
    marker = tmp_path / "writing"
    script = textwrap.dedent(
        f"""
        import sys, time
        import torch
        torch.set_num_threads(1)
        from pathlib import Path
        sys.path[:0] = [{str(REPO)!r}, {str(HERE)!r}]
        from moekit.training import checkpoint as ckpt
        from moekit.training.trainer import Trainer
        from training_helpers import make_stream, tiny_model, train_config
        from moekit.data import BatchConfig, BatchSampler, validation_batches

        def hang(tmp):
            if tmp.name.startswith(".tmp_step_000004"):
                Path({str(marker)!r}).write_text(str(tmp))
                time.sleep(60)

        ckpt._before_publish = hang
        sampler = BatchSampler(make_stream(), BatchConfig(batch_size=4, block_size=16, seed=0))
        val = list(validation_batches(make_stream(600, seed=1), 4, 16, max_batches=2))
        Trainer(tiny_model(), train_config(checkpoint_every=1), sampler, val, {str(out)!r}).train()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the training subprocess exited before the step-4 checkpoint"
            assert time.monotonic() < deadline, "timed out waiting for the checkpoint write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert Path(marker.read_text()).is_dir()  # the half-published checkpoint is still a hidden temp folder
    assert ckpt.latest_checkpoint(root).name == "step_000003"
    doc = ckpt.load_checkpoint(root, tiny_model())
    assert doc["step"] == 3
    # Resuming continues from step 3 and reproduces the uninterrupted run exactly; the temp folder goes.
    sampler, val = data
    result = Trainer(tiny_model(), train_config(checkpoint_every=1), sampler, val, out).train(resume=True)
    assert result.resumed_from == 3 and result.steps == 6
    assert not any(p.name.startswith(".tmp_") for p in root.iterdir())
    _, _, rows_a = _straight(tmp_path, data)
    assert _train_losses(rows_a) == _train_losses(read_metrics(out / "metrics.jsonl"))


def test_fresh_start_refuses_old_checkpoints_unless_overwrite(tmp_path, data):
    sampler, val = data
    out = tmp_path / "run"
    Trainer(tiny_model(), train_config(max_steps=2), sampler, val, out).train()
    with pytest.raises(ValueError, match="already holds checkpoints.*step_000002"):
        Trainer(tiny_model(), train_config(max_steps=3), sampler, val, out).train()
    result = Trainer(tiny_model(), train_config(max_steps=1), sampler, val, out).train(overwrite=True)
    assert result.steps == 1
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_000001"]
