"""Train several models step by step in alternation under one wall-clock budget.

Used for MoE vs dense comparisons on a shared machine: both models see the same machine conditions (load,
thermal state) at the same time, and a time limit stops them after the *same* number of steps, so
"steps to reach a loss" and tokens/s compare like with like.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moekit.training.progress import TrainProgress, progress_enabled
from moekit.training.trainer import Trainer, TrainResult


def train_lockstep(
    trainers: Mapping[str, Trainer],
    max_seconds: float | None = None,
    overwrite: bool = False,
    resume: bool | str | Path = False,
    progress: bool | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, TrainResult]:
    """Advance every trainer one optimizer step per round (alternating who goes first) until all reach
    their ``max_steps`` or the next round would end past ``max_seconds`` (estimated from the rounds so far,
    with room for a final evaluation); that round is every trainer's last step (evaluate, checkpoint), so all
    stop at the same step.

    The trainers should share ``max_steps``; each keeps its own schedule, metrics and checkpoints.
    ``failures``: when given, a trainer that raises is dropped (no result) and its error recorded there by
    name, and the others go on; otherwise the exception propagates.
    """
    if not trainers:
        raise ValueError("train_lockstep needs at least one trainer")
    names = list(trainers)
    live = dict(trainers)  # trainers still running (a failed one is dropped when failures is given)

    def call(name: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(live[name], method)(**kwargs)
        except Exception as exc:
            if failures is None:
                raise
            failures[name] = f"{type(exc).__name__}: {exc}"
            del live[name]
            return None

    for name in names:
        call(name, "begin", resume=resume, overwrite=overwrite)
    total = max(t.config.max_steps for t in trainers.values())
    t0 = time.perf_counter()
    step_s = 0.0  # moving average of a round without evaluation
    eval_s = 0.0  # the most a round's evaluations have cost on top of that
    done = min((t.steps_done for t in live.values()), default=0)
    with TrainProgress(total, " + ".join(names), progress_enabled(progress), completed=done) as bar:
        r = 0
        while live and not all(t.done for t in live.values()):
            elapsed = time.perf_counter() - t0
            last = max_seconds is not None and elapsed + step_s + eval_s >= max_seconds
            order = names[r % len(names) :] + names[: r % len(names)]
            r += 1
            t_round = time.perf_counter()
            rows = {}
            for name in order:
                if name in live and not live[name].done:
                    row = call(name, "run_step", last=last)
                    if row is not None:
                        rows[name] = row
            if not rows:
                continue
            dt = time.perf_counter() - t_round
            if any("val_loss" in row for row in rows.values()):
                eval_s = max(eval_s, dt - step_s)
            else:
                step_s = dt if step_s == 0.0 else 0.8 * step_s + 0.2 * dt
            first = next(iter(rows.values()))
            steps = min((t.steps_done for t in live.values()), default=0)
            bar.update(steps, loss=first["loss"], tokens_per_s=first["tokens_per_s"])
    results = {}
    for name in list(live):
        result = call(name, "end")
        if result is not None:
            results[name] = result
    return results
