"""The training loop: AdamW, warmup + cosine, grad clipping and accumulation, optional bf16 autocast,
seeded data order, routing statistics, JSONL metrics, atomic checkpoints and exact resume.

Data order: optimizer step ``s`` uses the micro-batches ``train_data.batch(s * grad_accum + j)``; with a
sampler whose batches are a pure function of (seed, index) a resumed run sees exactly the batches the
uninterrupted run would have, and with the model, optimizer and RNG states restored from the checkpoint the
loss curve is identical.

DynMoE (``TrainConfig.dynmoe_adapt_every``): between optimizer steps, experts are added and removed (see
`moekit.training.expert_adapt`); checkpoints record every MoE layer's E (``state.moe_experts``) and the routers'
observation records, and a resume resizes the model to those shapes before loading, so it stays exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from moekit.training import checkpoint as ckpt
from moekit.training import expert_adapt
from moekit.training._io import atomic_write_json
from moekit.training.config import TrainConfig
from moekit.training.metrics import MetricAverager, MetricsLogger, routing_metrics
from moekit.training.progress import TrainProgress, progress_enabled
from moekit.training.schedule import lr_at

ROUTING_FILE = "routing.json"


class BatchLike(Protocol):
    inputs: Tensor  # (B, L) int64
    targets: Tensor  # (B, L) int64


class BatchSource(Protocol):
    def batch(self, step: int) -> BatchLike: ...


@dataclass
class TrainResult:
    """What `Trainer.train` returns (also written as ``result.json`` in the output folder)."""

    name: str
    steps: int  # optimizer steps completed
    max_steps: int
    final_train_loss: float | None
    final_val_loss: float | None
    tokens: int
    wall_time: float  # seconds, including evaluation, summed over resumed runs
    train_time: float  # seconds spent in training steps only
    tokens_per_s: float | None  # training tokens / training time, first step of each run excluded
    stopped_early: bool
    resumed_from: int | None
    param_counts: dict[str, int] = field(default_factory=dict)
    metrics_path: str | None = None
    checkpoint: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)  # layer -> LayerSummary dict of the last window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, as in nanoGPT (none on gains, biases, thresholds)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, foreach=False)


@dataclass
class _Run:
    """Mutable state of one `Trainer.begin` ... `Trainer.end` run."""

    doc: dict[str, Any] | None  # the checkpoint resumed from
    start: int
    steps_done: int
    wall: float  # seconds of this trainer's own work, summed over resumed runs
    train_time: float
    tokens: int
    max_new_steps: int | None
    params: list[Tensor]
    done: bool = False
    stopped_early: bool = False
    timed_tokens: int = 0  # tokens and seconds of this run's steps after the first (for tokens/s)
    timed_time: float = 0.0
    last_loss: float | None = None
    last_val: float | None = None


class Trainer:
    """Train ``model`` (a ``MoETransformerLM`` or anything with the same forward) on ``train_data``.

    Args:
        model: returns an object with ``loss``, ``aux_loss``, ``moe_outputs`` from ``model(inputs, targets)``;
            ``model.after_optimizer_step()`` (if present) runs after every optimizer step; DynMoE adaptation
            also uses ``add_expert`` / ``remove_expert`` / ``resize_experts`` / ``num_experts_per_layer``.
        config: a `TrainConfig`.
        train_data: ``batch(i)`` -> batch with ``inputs`` / ``targets`` (B, L); a pure function of i.
        val_data: a sequence of such batches; the first ``config.eval_batches`` are scored.
        out_dir: where ``metrics.jsonl``, ``checkpoints/``, ``routing.json`` and ``result.json`` go (None:
            nothing is written).
        name: label in the progress bar, metrics and results.
        progress: rich progress bar; None = only on an interactive terminal outside pytest.
        monitor: keep a ``RoutingMonitor`` of the MoE layers (saved in checkpoints and ``routing.json``).
        extra_state: JSON-able dict stored in every checkpoint (e.g. the data config).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: BatchSource,
        val_data: Sequence[BatchLike] | None = None,
        out_dir: str | Path | None = None,
        name: str = "model",
        progress: bool | None = None,
        monitor: bool = True,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.model, self.config, self.train_data = model, config, train_data
        self.val_data = list(val_data)[: config.eval_batches] if val_data is not None else []
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.name = name
        self.progress = progress_enabled(progress)
        self.extra_state = dict(extra_state or {})
        can_adapt = all(callable(getattr(model, a, None)) for a in ("add_expert", "remove_expert"))
        if config.dynmoe_adapt_every and not (can_adapt and expert_adapt.adaptive_layers(model)):
            raise ValueError(
                "TrainConfig.dynmoe_adapt_every > 0 needs a model with MoE layers whose router can add and "
                "remove experts (router='dynmoe')"
            )
        self.optimizer = build_optimizer(model, config)
        self.device = next(model.parameters()).device
        self.monitor = self._make_monitor() if monitor else None
        self.metrics = MetricsLogger(self.out_dir / "metrics.jsonl") if self.out_dir is not None else None
        self.history: list[dict[str, Any]] = []  # rows of this run (also in metrics.jsonl)
        self._run: _Run | None = None

    # ------------------------------------------------------------------ helpers
    def _moe_layers(self) -> list[tuple[str, nn.Module]]:
        fn = getattr(self.model, "moe_layers", None)
        return list(fn()) if callable(fn) else []

    def _make_monitor(self, history_bin: int | None = None):  # noqa: ANN202
        layers = self._moe_layers()
        if not layers:
            return None
        from moekit.diagnostics import RoutingMonitor

        hb = history_bin or max(1, self.config.max_steps // 60)
        return RoutingMonitor([n for n, _ in layers], [m.num_experts for _, m in layers], history_bin=hb)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def param_counts(self) -> dict[str, int]:
        fn = getattr(self.model, "param_counts", None)
        if callable(fn):
            return dict(fn())
        n = sum(p.numel() for p in self.model.parameters())
        return {"total": n, "active": n}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy per target token over the validation batches (None without any)."""
        if not self.val_data:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in self.val_data:
                inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
                with self._autocast():
                    out = self.model(inputs, targets)
                n = int((targets != -100).sum())
                total += float(out.loss) * n
                count += n
        finally:
            self.model.train(was_training)
        return total / max(count, 1)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, steps_done: int, wall: float, train_time: float, tokens: int) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        model_cfg = getattr(self.model, "config", None)
        experts_fn = getattr(self.model, "num_experts_per_layer", None)
        state = {
            "name": self.name,
            "next_step": steps_done,
            "model_config": model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else None,
            # E of every MoE layer: DynMoE may have changed it, and a resume must rebuild these shapes first.
            "moe_experts": experts_fn() if callable(experts_fn) else None,
            "train_config": self.config.to_dict(),
            "data": {"seed": self.config.seed, "next_batch_index": steps_done * self.config.grad_accum},
            "wall_time": wall,
            "train_time": train_time,
            "tokens": tokens,
            "extra": self.extra_state,
        }
        extra = {}
        if self.monitor is not None:
            extra[ROUTING_FILE] = json.dumps(self.monitor.to_dict()).encode("utf-8")
        records = expert_adapt.router_records(self.model)
        if records:
            from safetensors.torch import save as st_save

            extra[expert_adapt.RECORDS_FILE] = st_save(records)
        return ckpt.save_checkpoint(
            self.checkpoint_dir,
            steps_done,
            self.model,
            self.optimizer,
            state=state,
            extra_files=extra,
            keep_last=self.config.keep_last,
        )

    def _check_fresh_start(self, overwrite: bool) -> None:
        """A fresh run must not mix its checkpoints with an earlier run's."""
        root = self.checkpoint_dir
        if root is None or not root.exists():
            return
        found = ckpt.latest_checkpoint(root)
        if found is None and not any(p.name.startswith(ckpt.PREFIX) for p in root.iterdir()):
            return
        if not overwrite:
            what = found.name if found is not None else "an incomplete one"
            raise ValueError(
                f"{str(root)!r} already holds checkpoints of an earlier run ({what}); "
                "resume it, overwrite it, or use another out_dir"
            )
        shutil.rmtree(root)

    def _resume(self, resume: bool | str | Path) -> dict[str, Any] | None:
        """Load the checkpoint to resume from; None when starting fresh."""
        if resume is False or resume is None:
            return None
        if resume is True:
            if self.checkpoint_dir is None:
                raise ValueError("resume=True needs an out_dir (the checkpoints live in out_dir/checkpoints)")
            if ckpt.latest_checkpoint(self.checkpoint_dir) is None:
                return None  # nothing to resume: a fresh start
            source: str | Path = self.checkpoint_dir
        else:
            source = resume
        doc = ckpt.read_checkpoint_state(source)
        saved_cfg = doc["state"].get("model_config")
        model_cfg = getattr(self.model, "config", None)
        if saved_cfg is not None and hasattr(model_cfg, "to_dict"):
            current = json.loads(json.dumps(model_cfg.to_dict()))
            if saved_cfg != current:
                diff = sorted(k for k in set(saved_cfg) | set(current) if saved_cfg.get(k) != current.get(k))
                raise ckpt.CheckpointError(
                    f"checkpoint {doc['path']!r} was made for a different model config (fields {diff})"
                )
        self._resize_to_checkpoint(doc)
        doc = ckpt.load_checkpoint(doc["path"], self.model, self.optimizer, restore_rng=True)
        self._load_router_records(doc["path"])
        if self.monitor is not None:
            data = ckpt.read_extra_file(doc["path"], ROUTING_FILE)
            if data is not None:
                from moekit.diagnostics import RoutingMonitor

                self.monitor = RoutingMonitor.from_dict(json.loads(data))
        return doc

    def _resize_to_checkpoint(self, doc: dict[str, Any]) -> None:
        """Give the MoE layers the E the checkpoint recorded (DynMoE changes) and rebuild the optimizer."""
        saved = doc["state"].get("moe_experts")
        resize = getattr(self.model, "resize_experts", None)
        if not saved or not callable(resize):
            return
        try:
            changed = resize(dict(saved))
        except (TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {doc['path']!r}: cannot apply its moe_experts: {exc}") from exc
        if changed:
            self.optimizer = build_optimizer(self.model, self.config)
            if self.monitor is not None:
                self.monitor = self._make_monitor()

    def _load_router_records(self, path: str) -> None:
        if not expert_adapt.adaptive_layers(self.model):
            return
        data = ckpt.read_extra_file(path, expert_adapt.RECORDS_FILE)
        if data is None:
            return  # a checkpoint from before records were saved: start a new observation window
        from safetensors.torch import load as st_load

        where = f"checkpoint file {str(Path(path) / expert_adapt.RECORDS_FILE)!r}"
        try:
            tensors = st_load(data)
            expert_adapt.load_router_records(self.model, tensors, where)
        except ValueError as exc:
            raise ckpt.CheckpointError(str(exc) if where in str(exc) else f"{where}: {exc}") from exc

    def _adapt_experts(self) -> list[dict[str, Any]]:
        """DynMoE between steps: add/remove experts, rebuild the optimizer keeping surviving experts' AdamW
        state, resize the routing monitor. Returns the changes as dicts (empty when nothing changed)."""
        old_params = dict(self.model.named_parameters())
        changes = expert_adapt.adapt_experts(self.model, self.config.dynmoe_min_experts)
        if not changes:
            return []
        old_optimizer = self.optimizer
        self.optimizer = build_optimizer(self.model, self.config)
        expert_adapt.transfer_optimizer_state(old_optimizer, self.optimizer, old_params, self.model, changes)
        self._run.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.monitor is not None:
            self.monitor = expert_adapt.resize_monitor(self.monitor, changes)
        return [c.to_dict() for c in changes]

    # ------------------------------------------------------------------ the loop
    def train(
        self, resume: bool | str | Path = False, max_new_steps: int | None = None, overwrite: bool = False
    ) -> TrainResult:
        """Run until ``config.max_steps`` (or ``config.max_seconds`` of wall-clock).

        ``resume``: True = continue from the latest checkpoint in ``out_dir/checkpoints`` if there is one (a
        fresh start otherwise), or a checkpoint path. A fresh start refuses an ``out_dir`` that already holds
        checkpoints unless ``overwrite=True`` (which deletes them). ``max_new_steps``: stop (evaluate and
        checkpoint) after that many steps of this call; the schedule still spans ``max_steps``, so a later
        resume continues it.
        """
        self.begin(resume, max_new_steps, overwrite)
        run = self._run
        with TrainProgress(self.config.max_steps, self.name, self.progress, completed=run.steps_done) as bar:
            while not run.done:
                row = self.run_step()
                bar.update(run.steps_done, loss=row["loss"], tokens_per_s=row["tokens_per_s"])
        return self.end()

    def begin(
        self, resume: bool | str | Path = False, max_new_steps: int | None = None, overwrite: bool = False
    ) -> None:
        """Start (or resume) a run step by step: ``begin()``, ``run_step()`` until ``done``, ``end()``.
        `train` does exactly that; `train_lockstep` interleaves several trainers."""
        if max_new_steps is not None and (
            isinstance(max_new_steps, bool) or not isinstance(max_new_steps, int) or max_new_steps < 1
        ):
            raise ValueError(f"max_new_steps must be an int >= 1 or None, got {max_new_steps!r}")
        doc = self._resume(resume)
        if doc is None:
            self._check_fresh_start(overwrite)
        state = doc["state"] if doc else {}
        start = int(state.get("next_step", 0))
        self._run = _Run(
            doc=doc,
            start=start,
            steps_done=start,
            wall=float(state.get("wall_time", 0.0)),
            train_time=float(state.get("train_time", 0.0)),
            tokens=int(state.get("tokens", 0)),
            max_new_steps=max_new_steps,
            params=[p for g in self.optimizer.param_groups for p in g["params"]],
            done=start >= self.config.max_steps,
        )
        if self.metrics is not None:
            self.metrics.reset(keep_before_step=start + 1)
        self.model.train()

    @property
    def done(self) -> bool:
        return self._run.done

    @property
    def steps_done(self) -> int:
        return self._run.steps_done

    def run_step(self, last: bool = False) -> dict[str, Any]:
        """One optimizer step, then evaluation / logging / checkpointing as due; returns its metrics row.

        ``last=True`` makes it the final step of this run (evaluate, checkpoint, stop), as do ``max_steps``,
        ``config.max_seconds`` and ``max_new_steps``."""
        cfg, run = self.config, self._run
        if run.done:
            raise RuntimeError(f"{self.name}: the run is over (call begin() to start another)")
        t_enter = time.perf_counter()
        step = run.steps_done
        row, step_tokens, dt = self._step(step, run.params)
        run.steps_done = steps_done = step + 1
        if cfg.dynmoe_adapt_every and steps_done % cfg.dynmoe_adapt_every == 0:
            changes = self._adapt_experts()
            if changes:
                row["dynmoe"] = changes
                row["num_experts"] = self.model.num_experts_per_layer()
        run.tokens += step_tokens
        run.train_time += dt
        if step > run.start:  # the first step of a run warms up caches: not counted in tokens/s
            run.timed_tokens += step_tokens
            run.timed_time += dt
        run.last_loss = row["loss"]
        elapsed = run.wall + time.perf_counter() - t_enter
        stop = last or (cfg.max_seconds is not None and elapsed >= cfg.max_seconds)
        stop = stop or (run.max_new_steps is not None and steps_done - run.start >= run.max_new_steps)
        is_last = steps_done >= cfg.max_steps or stop
        if (cfg.eval_every and steps_done % cfg.eval_every == 0) or is_last:
            run.last_val = row["val_loss"] = self.evaluate()
            if self.monitor is not None and steps_done > cfg.warmup_steps:
                row["collapsed_layers"] = self._check_collapse(steps_done)
                if not is_last:
                    self.monitor.reset()
        row.update(
            tokens=run.tokens,
            tokens_per_s=step_tokens / dt if dt > 0 else None,
            wall_time=run.wall + time.perf_counter() - t_enter,
            train_time=run.train_time,
        )
        if steps_done % cfg.log_every == 0 or "val_loss" in row or "dynmoe" in row or is_last:
            self.history.append(row)
            if self.metrics is not None:
                self.metrics.log(row)
        if (cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0) or is_last:
            wall = run.wall + time.perf_counter() - t_enter
            self.save_checkpoint(steps_done, wall, run.train_time, run.tokens)
        run.wall += time.perf_counter() - t_enter  # this trainer's own time (steps, evals, checkpoints)
        if is_last:
            run.done = True
            run.stopped_early = steps_done < cfg.max_steps
        return row

    def _check_collapse(self, steps_done: int) -> int:
        """Warn (``RouterCollapseWarning``, naming this run) about layers whose routing collapsed over the
        window since the last evaluation; returns how many did."""
        from moekit.diagnostics import RouterCollapseWarning

        bad = [s for s in self.monitor.summary().values() if s.collapsed]
        if bad:
            what = "; ".join(f"{s.layer} ({', '.join(s.reasons)})" for s in bad)
            warnings.warn(
                f"{self.name}: router collapse at step {steps_done}: {what}",
                RouterCollapseWarning,
                stacklevel=3,
            )
        return len(bad)

    def _step(self, step: int, params: list[Tensor]) -> tuple[dict[str, Any], int, float]:
        """One optimizer step (0-based ``step``): set the lr, accumulate ``grad_accum`` micro-batches, clip,
        update, run the model's after-step hook. Returns (metrics row, tokens, seconds)."""
        cfg = self.config
        lr = lr_at(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        avg = MetricAverager()
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            batch = self.train_data.batch(step * cfg.grad_accum + micro)  # a pure function of the index
            inputs = batch.inputs.to(self.device)  # (B, L)
            targets = batch.targets.to(self.device)  # (B, L)
            with self._autocast():
                out = self.model(inputs, targets)
            loss = out.loss + out.aux_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.name}: loss is {float(loss.detach())} at step {step + 1}")
            (loss / cfg.grad_accum).backward()
            avg.add({"loss": float(out.loss.detach()), "aux_loss": float(out.aux_loss.detach())})
            avg.add(routing_metrics(out.moe_outputs))
            if self.monitor is not None:
                for name, moe_out in zip(self.monitor.layers, out.moe_outputs, strict=True):
                    self.monitor.update(name, moe_out.stats, step=step)
            step_tokens += int(targets.numel())
        clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        hook = getattr(self.model, "after_optimizer_step", None)
        if callable(hook):
            hook()  # aux-loss-free bias update, DynMoE bookkeeping
        row = {"step": step + 1, **avg.mean(), "lr": lr, "grad_norm": grad_norm}
        return row, step_tokens, time.perf_counter() - t0

    def end(self) -> TrainResult:
        """Finish the `begin` run: write ``routing.json`` and ``result.json``, return the result."""
        run = self._run
        doc, steps_done, last_val = run.doc, run.steps_done, run.last_val
        if last_val is None and doc is not None:
            last_val = self.evaluate()  # resumed at the end: nothing trained, still report the val loss
        latest = ckpt.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        routing = {}
        if self.monitor is not None:
            routing = {n: s.to_dict() for n, s in self.monitor.summary().items()}
        result = TrainResult(
            name=self.name,
            steps=steps_done,
            max_steps=self.config.max_steps,
            final_train_loss=run.last_loss,
            final_val_loss=last_val,
            tokens=run.tokens,
            wall_time=run.wall,
            train_time=run.train_time,
            tokens_per_s=run.timed_tokens / run.timed_time if run.timed_time > 0 else None,
            stopped_early=run.stopped_early,
            resumed_from=int(doc["state"]["next_step"]) if doc else None,
            param_counts=self.param_counts(),
            metrics_path=str(self.metrics.path) if self.metrics is not None else None,
            checkpoint=str(latest) if latest is not None else None,
            routing=routing,
        )
        if self.out_dir is not None:
            if self.monitor is not None:
                self.monitor.to_json(self.out_dir / ROUTING_FILE)
            atomic_write_json(self.out_dir / "result.json", result.to_dict())
        return result
