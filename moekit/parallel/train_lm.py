"""Train the MoE LM from a config file with expert x data parallelism, under torchrun.

    torchrun --standalone --nproc-per-node 2 -m moekit.parallel.train_lm CONFIG [--ep N] [--out DIR]
             [--resume] [--overwrite]
    moekit train CONFIG --nproc 2          # launches the line above

The config file, data (bundled KJV corpus or a text path, BPE tokenizer, seeded batches), optimizer (AdamW,
warmup + cosine), output folder layout and checkpoint format are those of ``moekit train CONFIG``
(``moekit.training``). Every rank builds the model from ``run.seed``, shards each MoE layer's experts over its
EP group (``--ep``, default: all ranks; ``num_experts`` must be divisible by it) and keeps the other
parameters replicated. Batch ``i`` is ``train.batch_size`` windows, as in the single-process trainer; rank r
takes rows ``[r * B / W, (r + 1) * B / W)`` of it (``batch_size`` must be divisible by the world size W).
Gradients of replicated parameters are averaged over all ranks, expert gradients over their replicas (see
``moekit.parallel.data_parallel``), so each step is the single-process step on the same batch: dropless
layers (and capacity with ``capacity_scope="global"`` and DP = 1) give the single-process losses.

Checkpoints are written in the trainer's format with the experts and their AdamW moments gathered (see
``moekit.parallel.consolidate``): they resume at any EP size and in the single-process trainer. The logged
loss is the mean over the global batch; routing statistics are means over the ranks' local batches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moekit.models import LMConfig
from moekit.parallel.consolidate import load_training_checkpoint, save_training_checkpoint
from moekit.parallel.data_parallel import broadcast_replicated, clip_grad_norm_, sync_gradients
from moekit.parallel.ep_layer import expert_parallel, global_param_counts
from moekit.parallel.mesh import (
    DistributedError,
    ParallelGroups,
    build_groups,
    check_consistent,
    collective_device,
    collective_guard,
    init_distributed,
    shard_range,
)
from moekit.training import checkpoint as ckpt
from moekit.training.config import TrainConfig
from moekit.training.metrics import MetricAverager, MetricsLogger, routing_metrics
from moekit.training.progress import TrainProgress, progress_enabled
from moekit.training.runs import make_model
from moekit.training.schedule import lr_at
from moekit.training.trainer import BatchLike, BatchSource, TrainResult, build_optimizer

RESULT_FILE = "result.json"


def agree(fn: Callable[[], Any], what: str, group: dist.ProcessGroup | None = None) -> Any:
    """Run ``fn`` on every rank; if it raised on any rank, raise on all of them (never leave peers waiting in
    the next collective). The failing ranks re-raise their own error, the others a ``DistributedError``."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.long, device=collective_device())
    flags[dist.get_rank(group)] = int(error is not None)
    with collective_guard(f"{what} (error check)", group):
        dist.all_reduce(flags, group=group)
    if error is not None:
        raise error
    failed = flags.nonzero().flatten().tolist()
    if failed:
        raise DistributedError(f"{what} failed on ranks {failed} (see their error)")
    return result


def local_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's rows ``[lo, hi)`` of a batch of ``n`` rows split as evenly as possible (in rank order)."""
    return rank * n // world, (rank + 1) * n // world


class DistributedTrainer:
    """The `moekit.training.Trainer` loop for an expert-parallel (x data-parallel) LM; collective: every rank
    builds one with the same arguments and calls `train` (see the module doc).

    Args:
        model_config: the full model (global ``num_experts``).
        config: the `TrainConfig` of the single-process trainer (``batch_size`` is the global batch).
        train_data: ``batch(i)`` -> the global batch ``i`` (every rank holds the same source).
        val_data: validation batches (global; each rank scores its rows of each).
        groups: from `build_groups` (EP x DP mesh of the initialised world).
        out_dir: ``metrics.jsonl``, ``checkpoints/``, ``result.json`` (written by rank 0); None: nothing.
        seed: model initialisation (``run.seed``).
        capacity_scope: see `ExpertParallelMoELayer`.
    """

    def __init__(
        self,
        model_config: LMConfig,
        config: TrainConfig,
        train_data: BatchSource,
        val_data: Sequence[BatchLike] | None,
        groups: ParallelGroups,
        out_dir: str | Path | None = None,
        name: str = "model",
        seed: int = 0,
        progress: bool | None = None,
        capacity_scope: str = "global",
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not dist.is_initialized() or not groups.distributed:
            raise RuntimeError("DistributedTrainer needs torch.distributed and groups from build_groups")
        self.groups, self.world, self.rank = groups, groups.world_size, dist.get_rank()
        parallel = {"ep_size": groups.ep_size, "dp_size": groups.dp_size, "capacity_scope": capacity_scope}
        check_consistent(
            {"model": model_config.to_dict(), "train": config.to_dict(), "seed": seed, "name": name, **parallel},
            what="training configuration",
        )
        if config.batch_size % self.world:
            raise ValueError(
                f"TrainConfig.batch_size={config.batch_size} must be divisible by the world size {self.world} "
                "(every rank trains on batch_size / world rows of each batch)"
            )
        if getattr(config, "dynmoe_adapt_every", 0):
            raise ValueError(
                "TrainConfig.dynmoe_adapt_every > 0 (adding and removing experts) is not supported under expert "
                "parallelism: every EP rank must hold the same fixed number of experts; train it single-process"
            )
        if model_config.num_experts:
            shard_range(model_config.num_experts, groups.ep_size, groups.ep_rank)  # clear error if E % EP
        self.model_config, self.config, self.train_data = model_config, config, train_data
        self.val_data = list(val_data)[: config.eval_batches] if val_data is not None else []
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.name, self.seed = name, seed
        self.progress = progress_enabled(progress) and self.rank == 0
        self.parallel = {**parallel, "world_size": self.world}
        self.extra_state = dict(extra_state or {})
        model = make_model(model_config, seed).to(collective_device())  # NCCL: this rank's GPU; gloo: CPU
        self.model: nn.Module = expert_parallel(model, groups, capacity_scope)
        broadcast_replicated(self.model, groups)
        self.optimizer = build_optimizer(self.model, config)
        self.device = next(self.model.parameters()).device
        self.metrics = MetricsLogger(self.out_dir / "metrics.jsonl") if self.out_dir and self.rank == 0 else None
        self.history: list[dict[str, Any]] = []
        self._metric_keys: list[str] | None = None

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def param_counts(self) -> dict[str, int]:
        """Parameter counts of the full model (global E), as the single-process trainer reports them."""
        return global_param_counts(self.model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=collective_device())
        with collective_guard("metrics all_reduce"):
            dist.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy per target token over the validation batches (each rank scores its rows)."""
        if not self.val_data:
            return None
        self.model.eval()
        total, count = 0.0, 0.0
        try:
            for batch in self.val_data:
                lo, hi = local_rows(batch.inputs.shape[0], self.world, self.rank)
                weight = 1.0
                if hi == lo:  # fewer rows than ranks: score one row with weight 0 (the layers still exchange)
                    lo, hi, weight = 0, 1, 0.0
                inputs = batch.inputs[lo:hi].to(self.device)  # (b, L)
                targets = batch.targets[lo:hi].to(self.device)  # (b, L)
                with self._autocast():
                    out = self.model(inputs, targets)
                n = weight * float((targets != -100).sum())
                total += float(out.loss) * n
                count += n
        finally:
            self.model.train()
        total, count = self._sum([total, count])
        return total / max(count, 1.0)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, steps_done: int, wall: float, train_time: float, tokens: int) -> Path | None:
        """Collective. Writes ``checkpoints/step_*`` in the trainer's format (rank 0)."""
        if self.checkpoint_dir is None:
            return None
        state = {
            "name": self.name,
            "next_step": steps_done,
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "data": {"seed": self.config.seed, "next_batch_index": steps_done * self.config.grad_accum},
            "wall_time": wall,
            "train_time": train_time,
            "tokens": tokens,
            "extra": self.extra_state,
            "parallel": self.parallel,
        }
        root, keep = self.checkpoint_dir, self.config.keep_last
        return agree(
            lambda: save_training_checkpoint(root, steps_done, self.model, self.optimizer, self.groups, state, keep),
            "checkpoint save",
        )

    def _resume(self, resume: bool | str | Path, overwrite: bool) -> dict[str, Any] | None:
        """Load the checkpoint to resume from on every rank (None: a fresh start, the folder checked)."""
        root = self.checkpoint_dir

        def fresh() -> None:
            if self.rank != 0 or root is None or not root.exists():
                return
            if ckpt.latest_checkpoint(root) is None and not any(p.name.startswith(ckpt.PREFIX) for p in root.iterdir()):
                return
            if not overwrite:
                raise ValueError(
                    f"{str(root)!r} already holds checkpoints of an earlier run; resume it (--resume), "
                    "overwrite it (--overwrite), or use another out_dir"
                )
            shutil.rmtree(root)

        if resume is True:
            if root is None:
                raise ValueError("resume=True needs an out_dir (the checkpoints live in out_dir/checkpoints)")
            resume = root if ckpt.latest_checkpoint(root) is not None else False
        # All ranks must take the same branch (e.g. no shared file system: only some see the checkpoint).
        check_consistent(str(resume), what="checkpoint to resume from")
        if resume is False or resume is None:
            agree(fresh, "fresh-start check")
            return None

        def load() -> dict[str, Any]:
            doc = ckpt.read_checkpoint_state(resume)
            saved = doc["state"].get("model_config")
            current = json.loads(json.dumps(self.model_config.to_dict()))  # tuples as lists, as saved
            if saved is not None and saved != current:
                diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
                raise ckpt.CheckpointError(
                    f"checkpoint {doc['path']!r} was made for a different model config (fields {diff})"
                )
            doc = load_training_checkpoint(doc["path"], self.model, self.optimizer)
            ckpt.set_rng_state(doc["rng"])
            return doc

        return agree(load, "checkpoint load")

    # ------------------------------------------------------------------ the loop
    def train(
        self, resume: bool | str | Path = False, max_new_steps: int | None = None, overwrite: bool = False
    ) -> TrainResult:
        """Run until ``config.max_steps`` (same ``resume`` / ``max_new_steps`` / ``overwrite`` as
        `Trainer.train`)."""
        cfg = self.config
        doc = self._resume(resume, overwrite)
        state = doc["state"] if doc else {}
        start = int(state.get("next_step", 0))
        steps_done, wall = start, float(state.get("wall_time", 0.0))
        train_time, tokens = float(state.get("train_time", 0.0)), int(state.get("tokens", 0))
        timed_tokens, timed_time = 0, 0.0
        last_loss = last_val = None
        stopped_early = False
        if self.metrics is not None:
            self.metrics.reset(keep_before_step=start + 1)
        self.model.train()
        with TrainProgress(cfg.max_steps, self.name, self.progress, completed=steps_done) as bar:
            while steps_done < cfg.max_steps:
                t_enter = time.perf_counter()
                row, step_tokens, dt = self._step(steps_done)
                steps_done += 1
                tokens += step_tokens
                train_time += dt
                if steps_done - 1 > start:
                    timed_tokens, timed_time = timed_tokens + step_tokens, timed_time + dt
                last_loss = row["loss"]
                elapsed = wall + time.perf_counter() - t_enter
                stop = False
                if cfg.max_seconds is not None:  # any rank's clock: all ranks stop after the same step
                    stop = self._sum([float(elapsed >= cfg.max_seconds)])[0] > 0
                stop = stop or (max_new_steps is not None and steps_done - start >= max_new_steps)
                is_last = steps_done >= cfg.max_steps or stop
                if (cfg.eval_every and steps_done % cfg.eval_every == 0) or is_last:
                    last_val = row["val_loss"] = self.evaluate()
                row.update(
                    tokens=tokens,
                    tokens_per_s=step_tokens / dt if dt > 0 else None,
                    wall_time=wall + time.perf_counter() - t_enter,
                    train_time=train_time,
                )
                if steps_done % cfg.log_every == 0 or "val_loss" in row or is_last:
                    self.history.append(row)
                    if self.metrics is not None:
                        self.metrics.log(row)
                if (cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0) or is_last:
                    self.save_checkpoint(steps_done, wall + time.perf_counter() - t_enter, train_time, tokens)
                wall += time.perf_counter() - t_enter
                bar.update(steps_done, loss=row["loss"], tokens_per_s=row["tokens_per_s"])
                if is_last:
                    stopped_early = steps_done < cfg.max_steps
                    break
        if last_val is None and doc is not None:
            last_val = self.evaluate()
        latest = ckpt.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        result = TrainResult(
            name=self.name,
            steps=steps_done,
            max_steps=cfg.max_steps,
            final_train_loss=last_loss,
            final_val_loss=last_val,
            tokens=tokens,
            wall_time=wall,
            train_time=train_time,
            tokens_per_s=timed_tokens / timed_time if timed_time > 0 else None,
            stopped_early=stopped_early,
            resumed_from=int(state["next_step"]) if doc else None,
            param_counts=self.param_counts(),
            metrics_path=str(self.metrics.path) if self.metrics is not None else None,
            checkpoint=str(latest) if latest is not None else None,
        )
        if self.out_dir is not None and self.rank == 0:
            from moekit.training._io import atomic_write_json

            atomic_write_json(self.out_dir / RESULT_FILE, {**result.to_dict(), "parallel": self.parallel})
        return result

    def _step(self, step: int) -> tuple[dict[str, Any], int, float]:
        """One optimizer step on this rank's rows of the global batches (see `Trainer._step`)."""
        cfg = self.config
        lr = lr_at(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        avg = MetricAverager()
        step_tokens = 0
        lo, hi = local_rows(cfg.batch_size, self.world, self.rank)
        for micro in range(cfg.grad_accum):
            batch = self.train_data.batch(step * cfg.grad_accum + micro)  # the global batch
            inputs = batch.inputs[lo:hi].to(self.device)  # (B / W, L)
            targets = batch.targets[lo:hi].to(self.device)  # (B / W, L)
            with self._autocast():
                out = self.model(inputs, targets)
            loss = out.loss + out.aux_loss
            # Global values (equal row counts: the mean of the ranks' means), and every rank stops together.
            task, aux = (v / self.world for v in self._sum([float(out.loss.detach()), float(out.aux_loss.detach())]))
            if not math.isfinite(task + aux):
                raise FloatingPointError(f"{self.name}: loss is {task + aux} at step {step + 1}")
            (loss / cfg.grad_accum).backward()
            avg.add({"loss": task, "aux_loss": aux})
            avg.add(routing_metrics(out.moe_outputs))
            step_tokens += int(batch.targets.numel())
        sync_gradients(self.model, self.groups)
        clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = clip_grad_norm_(self.model, clip, self.groups)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()  # collective in expert-parallel layers (the load all-reduce)
        row = {"step": step + 1, **self._rank_mean(avg.mean()), "lr": lr, "grad_norm": grad_norm}
        return row, step_tokens, time.perf_counter() - t0

    def _rank_mean(self, values: dict[str, float]) -> dict[str, float]:
        """``loss`` and ``aux_loss`` are global already; the routing statistics are averaged over ranks."""
        keys = sorted(k for k in values if k not in ("loss", "aux_loss"))
        if self._metric_keys is None:
            check_consistent(keys, what="logged metric names")
            self._metric_keys = keys
        means = [v / self.world for v in self._sum([values[k] for k in keys])] if keys else []
        return {"loss": values["loss"], "aux_loss": values["aux_loss"], **dict(zip(keys, means, strict=True))}


# ---------------------------------------------------------------------------------------------- entry point
def train_from_config_distributed(
    path: str | Path,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    ep_size: int | None = None,
    capacity_scope: str = "global",
    progress: bool | None = None,
) -> dict[str, Any]:
    """``moekit train CONFIG`` on an initialised process group (every rank calls it); returns the summary
    (rank 0 also writes ``summary.json`` and ``loss.png`` to the output folder)."""
    from moekit.training._io import atomic_write_json
    from moekit.training.config_file import load_config
    from moekit.training.prepare import prepare_data

    cfg = load_config(path)
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.out_dir)
    groups = build_groups(ep_size)
    check_consistent(
        {"config": cfg.raw, "out": str(out), "resume": resume, "overwrite": overwrite, "ep": groups.ep_size},
        what="command line and config file",
    )
    # Rank 0 trains and saves the tokenizer first; the others then load it (prepare_data reuses out/tokenizer).
    rank = dist.get_rank()
    first = agree(lambda: prepare_data(cfg.data, cfg.train, out) if rank == 0 else None, "data preparation")
    data = agree(lambda: first if rank == 0 else prepare_data(cfg.data, cfg.train, out), "data preparation")
    model_cfg = cfg.model if cfg.model_vocab_given else replace(cfg.model, vocab_size=data.vocab_size)
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(
            f"config file {str(path)!r}: [model] vocab_size={model_cfg.vocab_size} is smaller than the "
            f"tokenizer's {data.vocab_size}"
        )
    runs = {cfg.run.name: model_cfg}
    if cfg.run.dense_baseline:
        runs["dense"] = model_cfg.dense_baseline()

    def refuse_old() -> None:
        if resume or overwrite:
            return
        for name in runs:
            if ckpt.latest_checkpoint(out / name / "checkpoints") is not None:
                raise ValueError(
                    f"{str(out / name / 'checkpoints')!r} already holds checkpoints of an earlier run; "
                    "pass --resume to continue, --overwrite to replace them, or choose another out_dir"
                )

    agree(refuse_old, "output folder check")
    extra = {"config_file": str(Path(path).resolve()), "data_config": cfg.data.to_dict(), "seed": cfg.run.seed}
    results, histories = {}, {}
    for name, mc in runs.items():
        trainer = DistributedTrainer(
            mc, cfg.train, data.sampler, data.val_batches, groups, out / name, name, cfg.run.seed, progress,
            capacity_scope, {**extra, "data_source": data.source},
        )  # fmt: skip
        results[name] = trainer.train(resume=resume, overwrite=overwrite).to_dict()
        histories[name] = trainer.history
    summary = {
        "config": str(path),
        "out_dir": str(out),
        "parallel": {"world_size": groups.world_size, "ep_size": groups.ep_size, "dp_size": groups.dp_size},
        "runs": results,
        "files": {},
    }
    if rank == 0:
        from moekit.training.plots import plot_loss_curves

        summary["files"]["loss_curves"] = str(plot_loss_curves(histories, out / "loss.png"))
        atomic_write_json(out / "summary.json", summary)
    return summary


def torchrun_command(
    config: str | Path,
    nproc: int,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    ep_size: int | None = None,
) -> list[str]:
    """The single-node torchrun command line that runs this module on ``nproc`` local processes."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "moekit.parallel.train_lm", str(config)]
    if out is not None:
        cmd += ["--out", str(out)]
    if ep_size is not None:
        cmd += ["--ep", str(ep_size)]
    return cmd + ["--resume"] * bool(resume) + ["--overwrite"] * bool(overwrite)


def launch(
    config: str | Path,
    nproc: int,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    ep_size: int | None = None,
) -> int:
    """Run `torchrun_command` (gloo over loopback unless ``GLOO_SOCKET_IFNAME`` is set); returns its exit
    status. torchrun stops every rank when one fails, and each collective times out, so this cannot hang.
    The ranks import the same moekit as this process (its folder goes first on ``PYTHONPATH``)."""
    import os
    import subprocess

    import moekit

    env = {**os.environ}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = str(Path(moekit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(torchrun_command(config, nproc, out, resume, overwrite, ep_size), env=env).returncode


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moekit.parallel.train_lm", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="TOML (or YAML) training config, as for `moekit train`")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: run.out_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (any EP size)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints of an earlier run")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (divides the world; default: all)")
    p.add_argument("--capacity-scope", choices=("global", "local"), default="global")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait for a peer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if not args.config.is_file():
        print(f"config file {str(args.config)!r} does not exist", file=sys.stderr)
        return 2
    init_distributed(timeout_s=args.timeout)
    try:
        summary = train_from_config_distributed(
            args.config, args.out, args.resume, args.overwrite, args.ep, args.capacity_scope,
            False if args.no_progress else None,
        )  # fmt: skip
        if dist.get_rank() == 0:
            par = summary["parallel"]
            print(f"world {par['world_size']} = dp {par['dp_size']} x ep {par['ep_size']}", flush=True)
            for name, r in summary["runs"].items():
                print(
                    f"{name}: {r['steps']} steps, train loss {r['final_train_loss']:.4f}, val loss "
                    f"{r['final_val_loss']}, tokens/s {r['tokens_per_s']}, checkpoint {r['checkpoint']}",
                    flush=True,
                )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
