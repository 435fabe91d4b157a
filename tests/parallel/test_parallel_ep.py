"""Expert parallelism on 2 and 4 gloo ranks (CPU, 127.0.0.1) against the single-process layer and LM.

Spawning ranks costs seconds, so each world size runs once (module fixtures) and the tests read its results.
"""

from __future__ import annotations

import json

import pytest
import torch
from parallel_workers import (
    LAYER_CASES,
    LM,
    LM_BATCH,
    LM_LR,
    LM_SEQ,
    LM_STEPS,
    eval_tokens,
    four_rank_suite,
    two_rank_suite,
)

from moekit.models import LMConfig
from moekit.parallel.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from moekit.parallel.launch import build_model, make_optimizer, train_lm
from moekit.parallel.spawn import spawn_ranks

TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ep_ckpt")


@pytest.fixture(scope="module")
def two(ckpt_dir):
    return spawn_ranks(two_rank_suite, 2, (str(ckpt_dir),), timeout_s=120)


@pytest.fixture(scope="module")
def four(two, ckpt_dir):  # needs the checkpoint written by the 2-rank run
    return spawn_ranks(four_rank_suite, 4, (str(ckpt_dir),), timeout_s=120)


@pytest.fixture(scope="module")
def single_run():
    """The single-process LM trained on the global batch (all ranks' rows), and its eval logits."""
    model = build_model(LMConfig(**LM), None, seed=0)
    opt = make_optimizer(model, LM_LR)
    losses = train_lm(model, None, LM_STEPS, LM_BATCH * 2, LM_SEQ, lr=LM_LR, seed=0, optimizer=opt)
    model.eval()
    with torch.no_grad():
        logits = model(eval_tokens()).logits
    model.train()
    following = train_lm(model, None, 2, LM_BATCH * 2, LM_SEQ, LM_LR, 0, start_step=LM_STEPS, optimizer=opt)
    return losses, logits, following


def _all_ranks(results, key):
    return [r["layer"][key] for r in results]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", [*LAYER_CASES, "empty_rank"])
def test_layer_outputs_and_gradients_match_single_process(request, world, case):
    results = request.getfixturevalue("two" if world == 2 else "four")
    for rank, res in enumerate(_all_ranks(results, case)):
        for key in ("out", "aux", "x_grad", "router_grad", "expert_grad", "shared_grad"):
            if key in res:
                assert res[key] <= TOL, f"rank {rank} {case}: {key} differs by {res[key]}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(
    "case", ["capacity_position", "capacity_probability", "capacity_probability_ties", "capacity_local"]
)
def test_capacity_drops_identical_to_single_process(request, world, case):
    results = request.getfixturevalue("two" if world == 2 else "four")
    res = _all_ranks(results, case)[0]
    assert res["dropped_ep"] == res["dropped_single"]
    assert sum(res["dropped_single"]) > 0, "the case should drop pairs"


@pytest.mark.parametrize("world", [2, 4])
def test_rank_without_tokens_and_idle_experts(request, world):
    results = request.getfixturevalue("two" if world == 2 else "four")
    res = _all_ranks(results, "empty_rank")
    assert res[1]["local_tokens"] == 0 and res[0]["local_tokens"] > 0
    # all pairs went to rank 0's experts: the others' experts got nothing, yet every check above passed


@pytest.mark.parametrize("world", [2, 4])
def test_counted_bytes_match_cost_model(request, world):
    results = request.getfixturevalue("two" if world == 2 else "four")
    for rank, res in enumerate(results):
        balanced = res["layer"]["bytes"]
        assert balanced["counted"]["dispatch.fwd"] > 0
        for tag, counted in balanced["counted"].items():
            assert counted == balanced["model"]["bytes_per_a2a"], (rank, tag)
        assert sum(balanced["counted"].values()) == balanced["model"]["bytes_per_layer"]
        dropless = res["layer"]["dropless"]
        assert dropless["bytes_counted"] == dropless["bytes_expected"]


def test_failures_are_clear_errors(two):
    for res in (r["layer"]["failures"] for r in two):
        assert "not divisible by the expert-parallel size 2" in res["indivisible"]
        assert "differs across ranks" in res["mismatch"] and "[1]" in res["mismatch"]
        assert "MoE layer configuration differs across ranks" in res["layer_mismatch"]
        assert res["after"] == 2.0


def test_training_steps_match_single_process(two, four, single_run):
    ref, _, _ = single_run
    assert len(ref) == LM_STEPS and ref[-1] < ref[0]
    for results, key in ((two, "losses"), (four, "losses_ep2_dp2")):
        for res in results:
            assert res[key] == pytest.approx(ref, abs=TOL)


def test_checkpoint_reshards(two, four, single_run, ckpt_dir):
    manifest = read_manifest(ckpt_dir)
    assert manifest["ep_size"] == 2 and len(manifest["shards"]) == 2
    assert not any(ckpt_dir.glob("*.pt")) and json.loads((ckpt_dir / "manifest.json").read_text())["extra"]

    _, trained, following = single_run
    ep2 = torch.tensor([row for res in two for row in res["logits"]])
    assert (ep2 - trained).abs().max() <= TOL  # the EP=2 model before saving

    single = build_model(LMConfig(**LM), None, seed=99)
    load_checkpoint(single, ckpt_dir)
    single.eval()
    with torch.no_grad():
        loaded = single(eval_tokens()).logits
    assert torch.equal(loaded, ep2) or (loaded - ep2).abs().max() <= TOL
    for ep in (4, 1, 2):
        got = torch.tensor([row for res in four for row in res[f"logits_ep{ep}"]])
        assert (got - loaded).abs().max() <= TOL, f"EP={ep}"
        # the AdamW moments were saved sharded and resharded too: the next steps continue the run
        for res in four:
            assert res[f"next_ep{ep}"] == pytest.approx(following, abs=TOL), f"EP={ep}"


def test_checkpoint_rejects_mismatched_model(two, ckpt_dir):
    other = build_model(LMConfig(**{**LM, "num_experts": 8}), None, seed=0)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(other, ckpt_dir)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(other, ckpt_dir / "missing")


def test_checkpoint_without_optimizer_state_says_so(tmp_path):
    model = build_model(LMConfig(**LM), None, seed=0)
    save_checkpoint(model, tmp_path / "weights_only")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(model, tmp_path / "weights_only", optimizer=make_optimizer(model))
