"""Checkpoints: exact round trip (tied weights, optimizer state, RNG), pruning, and clear errors for missing
or corrupt files."""

from __future__ import annotations

import json
import random

import pytest
import torch
from training_helpers import tiny_model

from moekit.training import checkpoint as ckpt
from moekit.training.config import TrainConfig
from moekit.training.trainer import build_optimizer


def _stepped(seed=0):
    model = tiny_model(seed)
    opt = build_optimizer(model, TrainConfig())
    x = torch.randint(0, 64, (2, 9))
    out = model(x[:, :-1], x[:, 1:])
    (out.loss + out.aux_loss).backward()
    opt.step()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = _stepped()
    torch.manual_seed(7)
    random.seed(7)
    path = ckpt.save_checkpoint(tmp_path, 5, model, opt, state={"hello": [1, 2]})
    expected_rand = torch.rand(3)
    assert path.name == "step_000005" and (tmp_path / "latest").read_text().strip() == "step_000005"
    doc = json.loads((path / ckpt.STATE_FILE).read_text())
    assert doc["aliases"] == {"lm_head.weight": "tok_embeddings.weight"}  # tied weight stored once

    model2, opt2 = _stepped(seed=3)
    doc = ckpt.load_checkpoint(tmp_path, model2, opt2, restore_rng=True)
    assert doc["state"] == {"hello": [1, 2]} and doc["step"] == 5
    assert torch.equal(torch.rand(3), expected_rand)  # RNG restored
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert model2.lm_head.weight is model2.tok_embeddings.weight  # still tied after loading
    sa, sb = opt.state_dict(), opt2.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid, st in sa["state"].items():
        for key, value in st.items():
            assert torch.equal(value, sb["state"][pid][key]), (pid, key)


def test_keep_last_and_latest_fallback(tmp_path):
    model, opt = _stepped()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    (tmp_path / "latest").write_text("step_000099\n")  # dangling pointer: fall back to the newest complete one
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000004"
    ckpt.save_checkpoint(tmp_path, 4, model, opt, keep_last=2)  # re-saving a step replaces it
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_missing_checkpoint_errors_name_the_path(tmp_path):
    model = tiny_model()
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope", model)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint found in"):
        ckpt.load_checkpoint(tmp_path, model)


@pytest.mark.parametrize("victim", [ckpt.MODEL_FILE, ckpt.OPTIM_FILE])
def test_corrupt_or_missing_file_is_reported_and_nothing_loaded(tmp_path, victim):
    model, opt = _stepped()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt)
    data = bytearray((path / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / victim).write_bytes(bytes(data))
    fresh = tiny_model(seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh_opt = build_optimizer(fresh, TrainConfig())
    with pytest.raises(ckpt.CheckpointError, match=f"{victim}.*corrupt"):
        ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
    (path / victim).unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{victim}.*missing"):
        ckpt.load_checkpoint(path, fresh, fresh_opt)


def test_corrupt_state_json_and_wrong_model(tmp_path):
    model, opt = _stepped()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt)
    with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
        ckpt.load_checkpoint(path, tiny_model(n_layers=3))
    (path / ckpt.STATE_FILE).write_bytes(b'{"format": "moekit.checkpoint", "vers')
    with pytest.raises(ckpt.CheckpointError, match="state.json.*not valid JSON"):
        ckpt.load_checkpoint(path, model)
    (path / ckpt.STATE_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(ckpt.CheckpointError, match="state.json"):
        ckpt.load_checkpoint(path, model)
