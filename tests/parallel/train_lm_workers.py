"""Rank functions for the distributed LM trainer tests (``moekit.parallel.train_lm``), run by ``spawn_ranks``.

They return JSON: per-step losses, errors seen, parameter counts; the tests compare them with the
single-process trainer on the same config, data and batches.
"""

from __future__ import annotations

from pathlib import Path

from moekit.models import LMConfig
from moekit.parallel.mesh import ConfigMismatchError, DistributedError, build_groups
from moekit.parallel.train_lm import DistributedTrainer, train_from_config_distributed
from moekit.training.config_file import load_config
from moekit.training.metrics import read_metrics
from moekit.training.prepare import prepare_data


def losses(rows: list[dict]) -> dict[str, list]:
    """Train losses of every step, val losses of the evaluated ones."""
    return {
        "loss": [r["loss"] for r in rows],
        "val": [[r["step"], r["val_loss"]] for r in rows if r.get("val_loss") is not None],
    }


def _error(fn) -> str | None:
    try:
        fn()
    except (ValueError, ConfigMismatchError, DistributedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def two_rank_suite(rank: int, world: int, config: str, other_config: str, out: str) -> dict:
    """EP=2 training from the config file, then the failure checks."""
    summary = train_from_config_distributed(config, Path(out) / "ep2", progress=False)
    run = next(iter(summary["runs"].values()))
    rows = read_metrics(Path(out) / "ep2" / run["name"] / "metrics.jsonl") if rank == 0 else []
    res = {"param_counts": run["param_counts"], "rows": losses(rows) if rank == 0 else None}
    # The same folder again without --resume / --overwrite: refused on every rank, before any training.
    res["refuse"] = _error(lambda: train_from_config_distributed(config, Path(out) / "ep2", progress=False))
    # Only rank 0 checks the run folder: it raises, and the others learn of it instead of waiting.
    groups = build_groups(world)
    cfg = load_config(config)
    data = prepare_data(cfg.data, cfg.train)
    trainer = DistributedTrainer(cfg.model, cfg.train, data.sampler, None, groups, Path(out) / "ep2" / "tiny")
    res["fresh"] = _error(trainer.train)
    # Rank 1 reads a config with another learning rate: every rank raises ConfigMismatchError.
    mine = config if rank == 0 else other_config
    res["mismatch"] = _error(lambda: train_from_config_distributed(mine, Path(out) / "bad", progress=False))
    # num_experts=3 cannot be split over 2 EP ranks.
    odd = LMConfig(**{**cfg.model.to_dict(), "num_experts": 3})
    res["indivisible"] = _error(lambda: DistributedTrainer(odd, cfg.train, data.sampler, None, groups))
    return res


def resume_suite(rank: int, world: int, config: str, checkpoint: str, out: str) -> dict:
    """Resume an EP=2 checkpoint with EP=4 (DP=1), EP=1 (DP=4) and EP=2 (DP=2) and train to the end."""
    cfg = load_config(config)
    data = prepare_data(cfg.data, cfg.train)
    res = {}
    for ep in (world, 1, 2):
        groups = build_groups(ep)
        trainer = DistributedTrainer(
            cfg.model, cfg.train, data.sampler, data.val_batches, groups, Path(out) / f"ep{ep}", cfg.run.name,
            cfg.run.seed, progress=False,
        )  # fmt: skip
        result = trainer.train(resume=checkpoint)
        res[f"ep{ep}"] = {**losses(trainer.history), "resumed_from": result.resumed_from}
    return res


def dynmoe_rank(rank: int, world: int, config: str) -> str:
    """The error for a config that adds and removes experts during training."""
    from dataclasses import replace

    cfg = load_config(config)
    train = replace(cfg.train, dynmoe_adapt_every=2)
    return _error(lambda: DistributedTrainer(cfg.model, train, None, None, build_groups(world))) or "no error"
