"""The LM trainer under expert parallelism (``moekit.parallel.train_lm``) on 2 and 4 gloo ranks: the same
losses as the single-process trainer on the same config, KJV data and batches; checkpoints (with AdamW
state) that resume at other EP sizes and in the single-process trainer; clear errors on bad setups."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file
from train_lm_workers import dynmoe_rank, losses, resume_suite, two_rank_suite

from moekit.parallel.spawn import spawn_ranks
from moekit.training import checkpoint as ckpt
from moekit.training.config import DataConfig, TrainConfig
from moekit.training.config_file import load_config
from moekit.training.prepare import prepare_data
from moekit.training.runs import make_model, torch_threads, train_run
from moekit.training.trainer import Trainer

TOL = 1e-5
TOML = """
[run]
name = "tiny"
seed = 3
[data]
vocab_size = 300
chapter_stride = 60
tokenizer = "{tokenizer}"
[model]
vocab_size = 300
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 32
num_experts = 4
k = 2
max_seq_len = 16
[train]
max_steps = 4
batch_size = 4
block_size = 16
lr = {lr}
warmup_steps = 1
eval_every = 2
eval_batches = 2
checkpoint_every = 2
keep_last = 3
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config files (sharing one tokenizer) and the single-process run of the config."""
    root = tmp_path_factory.mktemp("train_lm")
    tok_dir = root / "tok"
    prepare_data(DataConfig(vocab_size=300, chapter_stride=60), TrainConfig(block_size=16), tok_dir)  # the BPE, once
    config, other = root / "run.toml", root / "other.toml"
    config.write_text(TOML.format(tokenizer=tok_dir / "tokenizer.json", lr=0.01))
    other.write_text(TOML.format(tokenizer=tok_dir / "tokenizer.json", lr=0.02))
    cfg = load_config(config)
    data = prepare_data(cfg.data, cfg.train)
    with torch_threads(1):  # tiny ops: threads only spin on a busy machine
        single = train_run(cfg.run.name, cfg.model, cfg.train, data, root / "single", cfg.run.seed, progress=False)
    return {"root": root, "config": config, "other": other, "cfg": cfg, "data": data, "single": single}


@pytest.fixture(scope="module")
def two(setup):
    args = (str(setup["config"]), str(setup["other"]), str(setup["root"]))
    return spawn_ranks(two_rank_suite, 2, args, timeout_s=150)


@pytest.fixture(scope="module")
def step2(two, setup):
    """The EP=2 run's checkpoint after 2 of its 4 steps."""
    path = setup["root"] / "ep2" / "tiny" / "checkpoints" / "step_000002"
    assert (path / ckpt.STATE_FILE).is_file()
    return path


def _close(got: list, want: list) -> None:
    assert len(got) == len(want)
    assert got == pytest.approx(want, abs=TOL)


def test_ep2_training_matches_single_process(two, setup):
    ref = losses(setup["single"].rows)
    got = two[0]["rows"]
    assert len(ref["loss"]) == 4 and ref["loss"][-1] < ref["loss"][0]
    _close(got["loss"], ref["loss"])
    assert [s for s, _ in got["val"]] == [s for s, _ in ref["val"]] == [2, 4]
    _close([v for _, v in got["val"]], [v for _, v in ref["val"]])


def test_param_counts_use_global_experts(two, setup):
    want = setup["single"].model.param_counts()
    for res in two:  # each rank holds 2 of the 4 experts, yet reports the full model
        assert res["param_counts"] == want


def test_checkpoint_holds_full_experts_and_adam_moments(step2, setup):
    tensors = load_file(step2 / ckpt.MODEL_FILE)
    assert tensors["blocks.0.ffn.experts.down_proj"].shape[0] == 4
    doc = ckpt.read_checkpoint_state(step2)
    names = doc["state"]["parallel"]["param_names"]
    pid = names.index("blocks.1.ffn.experts.gate_up_proj")
    moments = load_file(step2 / ckpt.OPTIM_FILE)
    assert moments[f"{pid}.exp_avg"].shape == tensors["blocks.1.ffn.experts.gate_up_proj"].shape
    assert moments[f"{pid}.exp_avg_sq"].abs().sum() > 0
    assert doc["state"]["parallel"]["ep_size"] == 2


def test_single_process_trainer_resumes_ep2_checkpoint(step2, setup, two):
    cfg, data = setup["cfg"], setup["data"]
    trainer = Trainer(make_model(cfg.model, 99), cfg.train, data.sampler, data.val_batches, progress=False)
    with torch_threads(1):
        result = trainer.train(resume=str(step2))
    assert result.resumed_from == 2
    _close(losses(trainer.history)["loss"], two[0]["rows"]["loss"][2:])
    # and the same weights as the uninterrupted single-process run
    ref = setup["single"].model.state_dict()
    for name, t in trainer.model.state_dict().items():
        assert (t - ref[name]).abs().max() <= 1e-4, name


def test_ep2_checkpoint_resumes_with_ep4_and_ep1(step2, setup, two):
    out = setup["root"] / "resume"
    res = spawn_ranks(resume_suite, 4, (str(setup["config"]), str(step2), str(out)), timeout_s=150)
    ref = two[0]["rows"]
    final = load_file(setup["root"] / "ep2" / "tiny" / "checkpoints" / "step_000004" / ckpt.MODEL_FILE)
    for ep in ("ep4", "ep1", "ep2"):
        for rank, r in enumerate(res):
            assert r[ep]["resumed_from"] == 2, (rank, ep)
            _close(r[ep]["loss"], ref["loss"][2:])
            _close([v for _, v in r[ep]["val"]], [v for s, v in ref["val"] if s > 2])
        # the final checkpoint, gathered from 4, 1 or 2 x 2 shards, holds the EP=2 run's final weights
        got = load_file(out / ep / "checkpoints" / "step_000004" / ckpt.MODEL_FILE)
        assert got.keys() == final.keys()
        for name, t in got.items():
            assert (t - final[name]).abs().max() <= 1e-4, (ep, name)


def test_bad_setups_are_clear_errors_on_every_rank(two):
    for rank, res in enumerate(two):
        assert "already holds checkpoints" in res["refuse"], rank
        if rank == 0:
            assert res["fresh"].startswith("ValueError") and "already holds checkpoints" in res["fresh"]
        else:
            assert res["fresh"].startswith("DistributedError") and "failed on ranks [0]" in res["fresh"]
        assert "ConfigMismatchError" in res["mismatch"] and "differs across ranks" in res["mismatch"], rank
        assert "num_experts=3 is not divisible by the expert-parallel size 2" in res["indivisible"], rank


def test_dynmoe_adaptation_is_refused(setup):
    if not hasattr(setup["cfg"].train, "dynmoe_adapt_every"):
        pytest.skip("this TrainConfig has no DynMoE adaptation")
    res = spawn_ranks(dynmoe_rank, 2, (str(setup["config"]),), timeout_s=60)
    assert all("dynmoe_adapt_every" in r for r in res)
