"""Training several models in alternation: same results as alone, and a time limit stops all at one step."""

from __future__ import annotations

import pytest
from training_helpers import tiny_model, train_config

from moekit.training.lockstep import train_lockstep
from moekit.training.trainer import Trainer


def _pair(data, out=None, **cfg):
    sampler, val = data
    return {
        "moe": Trainer(tiny_model(), train_config(**cfg), sampler, val, out and out / "moe", name="moe"),
        "dense": Trainer(tiny_model(num_experts=0), train_config(**cfg), sampler, val, out and out / "dense"),
    }


def test_lockstep_matches_separate_runs(data):
    alone = _pair(data, max_steps=4)
    for t in alone.values():
        t.train()
    together = _pair(data, max_steps=4)
    results = train_lockstep(together)
    for name in ("moe", "dense"):
        assert [r["loss"] for r in together[name].history] == [r["loss"] for r in alone[name].history]
        assert results[name].steps == 4 and not results[name].stopped_early


def test_time_limit_stops_all_at_the_same_step(tmp_path, data):
    trainers = _pair(data, tmp_path, max_steps=50, checkpoint_every=0)
    results = train_lockstep(trainers, max_seconds=1e-9)
    assert [r.steps for r in results.values()] == [1, 1]
    assert all(r.stopped_early and r.final_val_loss is not None for r in results.values())
    assert (tmp_path / "moe" / "checkpoints" / "step_000001").is_dir()
    with pytest.raises(ValueError, match="at least one"):
        train_lockstep({})


def test_a_failing_trainer_is_dropped_when_failures_are_collected(data):
    trainers = _pair(data, max_steps=3)
    calls = []

    def boom() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("router exploded")

    trainers["moe"].model.after_optimizer_step = boom
    failures: dict[str, str] = {}
    results = train_lockstep(trainers, failures=failures)
    assert set(results) == {"dense"} and results["dense"].steps == 3
    assert failures == {"moe": "RuntimeError: router exploded"}
    with pytest.raises(RuntimeError, match="exploded"):
        calls.clear()
        train_lockstep(_pair(data, max_steps=3) | {"moe": trainers["moe"]})
