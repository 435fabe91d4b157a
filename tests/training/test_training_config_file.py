"""TOML / YAML run configs: typed loading and errors that name the file and the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moekit.training.config_file import load_config

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[run]
out_dir = "out"
dense_baseline = true

[data]
vocab_size = 512

[model]
d_model = 32
n_layers = 2
n_heads = 2
max_seq_len = 64
num_experts = 4
router = "topk"

[model.router_options]

[train]
max_steps = 10
lr = 1          # an int is fine for a float
block_size = 64
grad_clip = 0.5
"""


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_demo_toml_loads():
    cfg = load_config(REPO / "configs" / "demo.toml")
    assert cfg.train.max_steps == 300 and cfg.run.dense_baseline
    # The config file is the demo's model: same layout, so `moekit train configs/demo.toml` reproduces it.
    from moekit.training.demo import demo_configs

    demo_model, _, _ = demo_configs(cfg.model.vocab_size, smoke=False)
    for field in ("d_model", "n_layers", "n_heads", "d_ff", "num_experts", "k", "num_shared_experts", "router"):
        assert getattr(cfg.model, field) == getattr(demo_model, field), field
    assert not cfg.model_vocab_given and cfg.model.vocab_size == cfg.data.vocab_size


def test_good_toml_is_typed(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.d_model == 32 and cfg.model.vocab_size == 512 and cfg.model.router_options == {}
    assert cfg.run.out_dir == "out" and cfg.train.grad_clip == 0.5


@pytest.mark.parametrize(
    "edit, message",
    [
        (("lr = 1", "lr = 'fast'"), r"\[train\] lr: expected a number.*'fast' \(str\)"),
        (("max_steps = 10", "max_steps = 10.5"), r"\[train\] max_steps: expected an integer"),
        (("d_model = 32", "d_model = true"), r"\[model\] d_model: expected an integer"),
        (("dense_baseline = true", "dense_baseline = 1"), r"\[run\] dense_baseline: expected true or false"),
        (("grad_clip = 0.5", "grad_clipp = 0.5"), r"\[train\]: unknown key 'grad_clipp'"),
        (("[data]", "[dataa]"), r"unknown section 'dataa'"),
        (('router = "topk"', 'router = "nope"'), r"\[model\] LMConfig.router must be one of"),
        (("lr = 1", "lr = -1"), r"\[train\] TrainConfig.lr must lie in"),
        (("lr = 1", "lr = 1\ndynmoe_adapt_every = 'often'"), r"\[train\] dynmoe_adapt_every: expected an integer"),
        (("lr = 1", "lr = 1\ndynmoe_min_experts = 0"), r"\[train\] TrainConfig.dynmoe_min_experts must be >= 1"),
        (("lr = 1", "lr = 1\ndynmoe_adapt_every = 5"), r"dynmoe_adapt_every=5 needs \[model\] router = \"dynmoe\""),
        (("max_seq_len = 64", "max_seq_len = 32"), r"max_seq_len=32 is smaller than \[train\] block_size=64"),
        (
            ("[model.router_options]", "[model.router_options]\nn_iters = 3\n[model.extra]"),
            r"unknown key 'extra'",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ValueError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(_write(tmp_path, "[train\nlr = 1"))
    (tmp_path / "latin1.toml").write_bytes(b"[run]\nname = '\xe9'\n")
    with pytest.raises(ValueError, match="latin1.toml.*not valid UTF-8"):
        load_config(tmp_path / "latin1.toml")
    with pytest.raises(ValueError, match="unknown format '.ini'"):
        load_config(_write(tmp_path, "", "run.ini"))


def test_yaml_config_and_missing_pyyaml(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    text = "run:\n  name: m\ntrain:\n  max_steps: 3\n  lr: 0.01\nmodel:\n  num_experts: 2\n  k: 1\n"
    cfg = load_config(_write(tmp_path, text, "run.yaml"))
    assert cfg.train.max_steps == 3 and cfg.model.num_experts == 2 and cfg.run.name == "m"
    with pytest.raises(ValueError, match=r"\[train\] max_steps: expected an integer"):
        load_config(_write(tmp_path, "train:\n  max_steps: many\n", "bad.yml"))
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml were not installed
    with pytest.raises(ValueError, match="run.yaml.*needs pyyaml"):
        load_config(tmp_path / "run.yaml")
