"""DynMoE expert add/remove between steps in the trainer: the change itself, consistent shapes and AdamW
state, metrics, checkpoints recording per-layer E, and bit-exact resume after an adaptation."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import tiny_model, train_config

from moekit.training import checkpoint as ckpt
from moekit.training import expert_adapt
from moekit.training.config import TrainConfig
from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer, build_optimizer

GROW, SHRINK = "blocks.0.ffn", "blocks.1.ffn"
OPTIONS = {"max_experts": 6, "removal_window": 2, "init_threshold": 5.0}


def forced_model(seed: int = 0):
    """Layer 0: every threshold high, so no token activates an expert and the layer grows (new experts get
    the same high threshold) up to max_experts. Layer 1: expert 0 always active, experts 1..3 never, so
    they are unused and get removed (down to dynmoe_min_experts)."""
    model = tiny_model(seed, router="dynmoe", router_options=OPTIONS)
    layers = dict(model.moe_layers())
    with torch.no_grad():
        layers[GROW].router.thresholds.fill_(5.0)
        layers[SHRINK].router.thresholds.copy_(torch.tensor([-5.0, 5.0, 5.0, 5.0]))
    return model


def adapt_config(**kw) -> TrainConfig:
    return train_config(dynmoe_adapt_every=2, dynmoe_min_experts=2, **kw)


def _check_consistent(trainer: Trainer) -> None:
    model, opt = trainer.model, trainer.optimizer
    for _, layer in model.moe_layers():
        E = layer.num_experts
        assert layer.router.num_experts == layer.experts.num_experts == E
        assert layer.router.gate_vectors.shape[0] == layer.router.thresholds.shape[0] == E
        assert layer.experts.in_proj.shape[0] == layer.experts.down_proj.shape[0] == E
        assert layer.router.activation_counts.shape == (E,) and layer.load_since_step.shape == (E,)
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    model_params = [p for p in model.parameters() if p.requires_grad]
    assert len(opt_params) == len(model_params) and {id(p) for p in opt_params} == {id(p) for p in model_params}
    for p in opt_params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].shape == p.shape, key


def test_adaptation_grows_and_shrinks_with_consistent_state(tmp_path, data):
    sampler, val = data
    trainer = Trainer(forced_model(), adapt_config(), sampler, val, tmp_path / "run")
    result = trainer.train()
    assert result.steps == 6 and result.final_val_loss is not None
    assert torch.isfinite(torch.tensor(result.final_val_loss))
    assert trainer.model.num_experts_per_layer() == {GROW: 6, SHRINK: 2}
    _check_consistent(trainer)
    assert trainer.monitor.num_experts == {GROW: 6, SHRINK: 2}

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    changes = {r["step"]: r["dynmoe"] for r in rows if "dynmoe" in r}
    assert sorted(changes) == [2, 4]  # at step 6 layer 0 is full and layer 1 has nothing unused
    first = {c["layer"]: c for c in changes[2]}
    assert first[GROW] == {"layer": GROW, "removed": [], "added": [4], "num_experts": 5}
    assert first[SHRINK] == {"layer": SHRINK, "removed": [2, 3], "added": [], "num_experts": 2}
    assert [c["layer"] for c in changes[4]] == [GROW] and changes[4][0]["added"] == [5]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in rows)
    # the checkpoint records per-layer E, and a model rebuilt from it gives the same outputs
    doc = ckpt.read_checkpoint_state(tmp_path / "run" / "checkpoints")
    assert doc["state"]["moe_experts"] == {GROW: 6, SHRINK: 2}
    loaded, _ = ckpt.load_lm_checkpoint(tmp_path / "run" / "checkpoints")
    trainer.model.eval()
    batch = val[0]
    assert torch.equal(loaded(batch.inputs).logits, trainer.model(batch.inputs).logits)


def test_surviving_experts_keep_their_adamw_moments(data):
    sampler, _ = data
    model = forced_model()
    opt = build_optimizer(model, adapt_config())
    batch = sampler.batch(0)
    out = model(batch.inputs, batch.targets)
    (out.loss + out.aux_loss).backward()
    opt.step()
    old_params = dict(model.named_parameters())
    old_down = opt.state[old_params[f"{SHRINK}.experts.down_proj"]]["exp_avg"].clone()  # (4, D, F)
    old_gate = opt.state[old_params[f"{SHRINK}.router.gate_vectors"]]["exp_avg_sq"].clone()  # (4, D)
    old_step = opt.state[old_params[f"{SHRINK}.router.gate_vectors"]]["step"].clone()

    model.remove_expert(SHRINK, 1)
    model.add_expert(SHRINK)
    change = expert_adapt.ExpertChange(SHRINK, [1], [3], 4, [0, 2, 3, None])
    new = build_optimizer(model, adapt_config())
    expert_adapt.transfer_optimizer_state(opt, new, old_params, model, [change])
    params = dict(model.named_parameters())
    down = new.state[params[f"{SHRINK}.experts.down_proj"]]["exp_avg"]
    gate = new.state[params[f"{SHRINK}.router.gate_vectors"]]
    assert torch.equal(down[:3], old_down[[0, 2, 3]]) and torch.equal(down[3], torch.zeros_like(down[3]))
    assert torch.equal(gate["exp_avg_sq"][:3], old_gate[[0, 2, 3]]) and not gate["exp_avg_sq"][3].any()
    assert torch.equal(gate["step"], old_step)
    same = params[f"{GROW}.experts.down_proj"]  # an untouched layer keeps its state object
    assert new.state[same] is opt.state[same]
    # one more step runs with the carried state
    out = model(batch.inputs, batch.targets)
    (out.loss + out.aux_loss).backward()
    new.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_after_an_adaptation_is_exact(tmp_path, data):
    sampler, val = data
    straight = Trainer(forced_model(), adapt_config(), sampler, val, tmp_path / "straight")
    res_a = straight.train()
    rows_a = read_metrics(tmp_path / "straight" / "metrics.jsonl")

    out = tmp_path / "split"
    Trainer(forced_model(), adapt_config(), sampler, val, out).train(max_new_steps=3)  # adapted at step 2
    assert ckpt.read_checkpoint_state(out / "checkpoints")["state"]["moe_experts"] == {GROW: 5, SHRINK: 2}
    torch.manual_seed(999)
    # a new "process": a model built from the config (initial E), weights, E, records and RNG from the checkpoint
    second = Trainer(tiny_model(seed=5, router="dynmoe", router_options=OPTIONS), adapt_config(), sampler, val, out)
    res_b = second.train(resume=True)
    rows_b = read_metrics(out / "metrics.jsonl")
    assert res_b.resumed_from == 3

    def key(rows):  # the split run also evaluates at step 3, where it stopped: compare the common evaluations
        return [(r["step"], r["loss"], r["aux_loss"], r.get("dynmoe"), r.get("num_experts")) for r in rows], {
            r["step"]: r["val_loss"] for r in rows if r["step"] % 2 == 0
        }

    assert key(rows_a) == key(rows_b)
    assert res_a.final_val_loss == res_b.final_val_loss
    sa, sb = straight.model.state_dict(), second.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[n], sb[n]) for n in sa)
    _check_consistent(second)


def test_adaptation_needs_an_adaptive_router(data):
    sampler, val = data
    with pytest.raises(ValueError, match="dynmoe_adapt_every.*dynmoe"):
        Trainer(tiny_model(), adapt_config(), sampler, val)


@pytest.mark.parametrize(("field", "value"), [("dynmoe_adapt_every", -1), ("dynmoe_min_experts", 0)])
def test_adapt_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        train_config(**{field: value})


def test_checkpoint_with_bad_moe_experts_is_a_clear_error(tmp_path, data):
    sampler, val = data
    Trainer(forced_model(), adapt_config(max_steps=2), sampler, val, tmp_path / "run").train()
    state_path = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") / ckpt.STATE_FILE
    doc = json.loads(state_path.read_text())
    doc["state"]["moe_experts"] = {"blocks.9.ffn": 3}
    state_path.write_text(json.dumps(doc))
    with pytest.raises(ckpt.CheckpointError, match="moe_experts.*MoE layers"):
        ckpt.load_lm_checkpoint(tmp_path / "run" / "checkpoints")
    other = Trainer(forced_model(), adapt_config(max_steps=4), sampler, val, tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError, match="moe_experts"):
        other.train(resume=True)


def test_load_lm_checkpoint_bad_input(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="nope.*does not exist"):
        ckpt.load_lm_checkpoint(tmp_path / "nope")
    model = tiny_model()
    path = ckpt.save_checkpoint(tmp_path / "plain", 1, model, state={"note": "no model config"})
    with pytest.raises(ckpt.CheckpointError, match="state.json.*no model_config"):
        ckpt.load_lm_checkpoint(path)
    path = ckpt.save_checkpoint(tmp_path / "lm", 1, model, state={"model_config": model.config.to_dict()})
    loaded, _ = ckpt.load_lm_checkpoint(path)
    sa, sb = loaded.state_dict(), model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[n], sb[n]) for n in sa)
    (path / ckpt.MODEL_FILE).write_bytes(b"truncated")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors.*corrupt"):
        ckpt.load_lm_checkpoint(path)


def test_resume_from_a_missing_checkpoint_names_it(tmp_path, data):
    sampler, val = data
    trainer = Trainer(tiny_model(), train_config(max_steps=2), sampler, val, tmp_path / "run")
    with pytest.raises(ckpt.CheckpointError, match="elsewhere.*does not exist"):
        trainer.train(resume=tmp_path / "elsewhere")


DYNMOE_TOML = """
[run]
name = "dyn"
dense_baseline = true
[data]
vocab_size = 300
chapter_stride = 60
[model]
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 32
num_experts = 2
max_seq_len = 32
router = "dynmoe"
[model.router_options]
max_experts = 3
init_threshold = 5.0
[train]
max_steps = 2
batch_size = 2
block_size = 32
eval_batches = 1
dynmoe_adapt_every = 1
"""


def test_train_from_config_with_dynmoe_and_dense_baseline(tmp_path):
    from moekit.training.config_file import train_from_config

    path = tmp_path / "dyn.toml"
    path.write_text(DYNMOE_TOML)
    summary = train_from_config(path, out_dir=tmp_path / "run", progress=False)
    assert summary["runs"]["dyn"]["steps"] == 2 and summary["runs"]["dense"]["steps"] == 2
    doc = ckpt.read_checkpoint_state(tmp_path / "run" / "dyn" / "checkpoints")
    assert doc["state"]["moe_experts"] == {"blocks.0.ffn": 3, "blocks.1.ffn": 3}  # grown to max_experts
    rows = read_metrics(tmp_path / "run" / "dyn" / "metrics.jsonl")
    assert rows[0]["num_experts"] == {"blocks.0.ffn": 3, "blocks.1.ffn": 3}
