"""The training loop: learning, hooks, accumulation, bf16, time budget, metrics rows."""

from __future__ import annotations

import pytest
import torch
from training_helpers import tiny_model, train_config

from moekit.training.metrics import read_metrics
from moekit.training.trainer import Trainer


def test_loss_goes_down_and_metrics_are_logged(tmp_path, data):
    sampler, val = data
    cfg = train_config(max_steps=25, eval_every=12, lr=1e-2, warmup_steps=3, checkpoint_every=0)
    trainer = Trainer(tiny_model(), cfg, sampler, val, tmp_path)
    result = trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [12, 24, 25]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    keys = {"loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "wall_time", "train_time", "tokens"}
    keys |= {"load_cv", "dropped_share", "zero_expert_share", "router_entropy", "experts_per_token"}
    keys |= {"aux/load_balance", "aux/z_loss"}
    assert keys <= set(rows[0])
    assert 0 < rows[0]["router_entropy"] <= 1.0 and rows[0]["experts_per_token"] == 2.0
    assert result.steps == 25 and result.final_val_loss == evals[-1]["val_loss"]
    assert result.tokens == 25 * 4 * 16 and result.tokens_per_s > 0
    assert set(result.routing) == {"blocks.0.ffn", "blocks.1.ffn"}
    assert (tmp_path / "routing.json").is_file() and (tmp_path / "result.json").is_file()
    assert result.checkpoint.endswith("step_000025")


def test_after_optimizer_step_runs_once_per_step(data):
    sampler, val = data
    model = tiny_model()
    calls = []
    model.after_optimizer_step = lambda: calls.append(1)
    Trainer(model, train_config(max_steps=3, grad_accum=2), sampler, val).train()
    assert len(calls) == 3


def test_aux_loss_free_bias_hook_sees_the_load(data):
    """The router hook gets the load accumulated since the previous optimizer step (all micro-batches)."""
    sampler, val = data
    model = tiny_model()
    seen = []
    _, layer = model.moe_layers()[0]
    original = layer.router.after_optimizer_step
    layer.router.after_optimizer_step = lambda load: (seen.append(int(load.sum())), original(load))
    Trainer(model, train_config(max_steps=2, grad_accum=2), sampler, val).train()
    assert seen == [2 * 2 * 4 * 16] * 2  # k * micro-batches * B * L pairs per step


def test_grad_accumulation_matches_one_big_batch():
    """Two micro-batches of B rows, averaged, give the gradient of the 2B batch (equal token counts)."""
    from training_helpers import make_stream

    from moekit.data import BatchConfig, BatchSampler

    class Concat:
        def __init__(self, sampler):
            self.sampler = sampler

        def batch(self, i):
            a, b = self.sampler.batch(2 * i), self.sampler.batch(2 * i + 1)
            return type(a)(*(torch.cat([x, y]) for x, y in zip(
                (a.tokens, a.part_ids, a.book_ids, a.starts), (b.tokens, b.part_ids, b.book_ids, b.starts),
                strict=True)))  # fmt: skip

    small = BatchSampler(make_stream(), BatchConfig(batch_size=4, block_size=16, seed=0))
    cfg = dict(max_steps=2, eval_every=0, lr=1e-3, warmup_steps=0, grad_clip=None)
    # loss_weights={} so the per-micro-batch aux losses (nonlinear in the batch) do not enter the comparison
    a = Trainer(tiny_model(loss_weights={}), train_config(batch_size=4, grad_accum=2, **cfg), small)
    b = Trainer(tiny_model(loss_weights={}), train_config(batch_size=8, **cfg), Concat(small))
    a.train()
    b.train()
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_dense_model_and_time_budget(tmp_path, data):
    sampler, val = data
    model = tiny_model(num_experts=0)  # dense: no routing stats, no monitor
    cfg = train_config(max_steps=50, precision="bf16", max_seconds=1e-6, checkpoint_every=0)
    result = Trainer(model, cfg, sampler, val, tmp_path).train()
    assert result.steps == 1 and result.stopped_early and result.final_val_loss is not None
    assert result.routing == {} and not (tmp_path / "routing.json").exists()
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert "load_cv" not in row and row["val_loss"] == result.final_val_loss


def test_non_finite_loss_raises(data):
    sampler, val = data
    model = tiny_model()
    with torch.no_grad():
        model.tok_embeddings.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        Trainer(model, train_config(max_steps=2), sampler, val).train()
