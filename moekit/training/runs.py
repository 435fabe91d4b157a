"""Building blocks shared by the demo, the router comparison and the LM benchmark: seeded model
construction, one training run, step-time calibration and curve comparisons."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moekit.models import LMConfig, MoETransformerLM
from moekit.training.config import TrainConfig
from moekit.training.prepare import PreparedData
from moekit.training.trainer import Trainer, TrainResult


@dataclass
class RunOutcome:
    """A trained model with its trainer (metrics history, routing monitor) and result."""

    model: MoETransformerLM
    trainer: Trainer
    result: TrainResult

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.trainer.history


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged); restores the old value.

    On a busy machine one thread per process can be several times faster than two (no spinning)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_model(config: LMConfig, seed: int) -> MoETransformerLM:
    """``MoETransformerLM(config)`` initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return MoETransformerLM(config)


def make_trainer(
    name: str,
    model_config: LMConfig,
    train_config: TrainConfig,
    data: PreparedData,
    out_dir: str | Path | None,
    seed: int = 0,
    progress: bool | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Trainer:
    """A `Trainer` of a freshly built (seeded) model on ``data``."""
    model = make_model(model_config, seed)
    return Trainer(
        model,
        train_config,
        data.sampler,
        data.val_batches,
        out_dir=out_dir,
        name=name,
        progress=progress,
        extra_state={"seed": seed, "data_source": data.source, **(extra_state or {})},
    )


def train_run(
    name: str,
    model_config: LMConfig,
    train_config: TrainConfig,
    data: PreparedData,
    out_dir: str | Path | None,
    seed: int = 0,
    progress: bool | None = None,
    resume: bool = False,
    extra_state: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> RunOutcome:
    """Build the model (seeded), train it on ``data`` and return everything (see `Trainer.train` for
    ``resume`` and ``overwrite``)."""
    trainer = make_trainer(name, model_config, train_config, data, out_dir, seed, progress, extra_state)
    result = trainer.train(resume=resume, overwrite=overwrite)
    return RunOutcome(trainer.model, trainer, result)


def measure_step_seconds(
    model_config: LMConfig, train_config: TrainConfig, data: PreparedData, seed: int = 0, steps: int = 2
) -> float:
    """Seconds per optimizer step of a throwaway model: one warm-up step, then the mean of ``steps``."""
    cfg = replace(train_config, max_steps=steps + 1, eval_every=0, checkpoint_every=0, max_seconds=None)
    model = make_model(model_config, seed)
    trainer = Trainer(model, cfg, data.sampler, None, out_dir=None, progress=False, monitor=False)
    t0 = time.perf_counter()
    result = trainer.train()
    if result.tokens_per_s:
        return cfg.tokens_per_step / result.tokens_per_s
    return (time.perf_counter() - t0) / (steps + 1)


def steps_to_reach(rows: list[dict[str, Any]], target: float | None) -> int | None:
    """The first evaluated step whose ``val_loss <= target`` (None if never, or no target)."""
    if target is None:
        return None
    for r in rows:
        if r.get("val_loss") is not None and r["val_loss"] <= target:
            return int(r["step"])
    return None


def routing_summary(result: TrainResult) -> dict[str, float | int | None]:
    """Means over MoE layers of the last monitoring window: load CV, dead experts (summed), experts per
    token, dropped and zero-expert shares, normalised router entropy (empty dict for dense models)."""
    layers = list(result.routing.values())
    if not layers:
        return {}

    def mean(key: str) -> float | None:
        vals = [layer[key] for layer in layers if layer.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "load_cv": mean("load_cv"),
        "max_mean_load": mean("max_mean_load"),
        "dead_experts": sum(len(layer["dead_experts"]) for layer in layers),
        "experts_per_token": mean("experts_per_token"),
        "dropped_share": mean("dropped_share"),
        "zero_expert_share": mean("zero_expert_share"),
        "router_entropy_norm": mean("router_entropy_norm"),
        "collapsed_layers": sum(bool(layer["collapsed"]) for layer in layers),
    }
