"""Per-step training metrics: routing statistics averaged over MoE layers, and a JSONL log file.

Each line of ``metrics.jsonl`` is one JSON object with at least ``step``; training rows carry ``loss``,
``aux_loss``, ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``, ``wall_time``, ``train_time`` and, for MoE
models, ``load_cv``, ``dropped_share``, ``zero_expert_share``, ``router_entropy`` (normalised by log E),
``experts_per_token`` and ``aux/<name>`` (unweighted, mean over layers); evaluation steps add ``val_loss``
(and, after warmup, ``collapsed_layers``: MoE layers whose routing collapsed since the last evaluation).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moekit.output import MoEOutput

ROUTING_KEYS = ("load_cv", "dropped_share", "zero_expert_share", "router_entropy", "experts_per_token")


def routing_metrics(moe_outputs: Sequence[MoEOutput]) -> dict[str, float]:
    """Means over MoE layers of the routing stats of one forward pass (empty for a dense model).

    ``router_entropy`` is divided by ``log E`` (1 = uniform); ``aux/<name>`` are the unweighted losses.
    """
    sums: dict[str, list[float]] = {}
    for out in moe_outputs:
        stats = out.stats
        E = int(stats["tokens_per_expert"].numel()) if "tokens_per_expert" in stats else 0
        for key in ROUTING_KEYS:
            if key in stats:
                value = float(stats[key])
                if key == "router_entropy":
                    if E < 2:
                        continue
                    value /= math.log(E)
                sums.setdefault(key, []).append(value)
        for name, loss in out.losses.items():
            sums.setdefault(f"aux/{name}", []).append(float(loss.detach()))
    return {k: sum(v) / len(v) for k, v in sums.items() if v}


class MetricAverager:
    """Averages dicts of floats (e.g. over gradient-accumulation micro-batches)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
            self._counts[k] = self._counts.get(k, 0) + 1

    def mean(self) -> dict[str, float]:
        return {k: self._sums[k] / self._counts[k] for k in self._sums}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    return value


class MetricsLogger:
    """Appends one JSON object per line to ``path`` (flushed per line)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict[str, Any]) -> None:
        if "step" not in row:
            raise ValueError("a metrics row needs a 'step'")
        line = json.dumps({k: _clean(v) for k, v in row.items()}, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def reset(self, keep_before_step: int = 0) -> None:
        """Keep only rows with ``step < keep_before_step`` (0: none), rewriting the file atomically; used on
        resume so that the log continues exactly where the checkpoint was taken."""
        rows = [r for r in read_metrics(self.path, missing_ok=True) if r["step"] < keep_before_step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike[str], missing_ok: bool = False) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL file; a truncated last line (a killed writer) is ignored, any other bad line
    raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise ValueError(f"metrics file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # no newline after it: an interrupted write
                break
            raise ValueError(f"metrics file {str(path)!r} line {i} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"metrics file {str(path)!r} line {i} has no integer 'step'")
        rows.append(row)
    return rows


def series(rows: Iterable[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of the rows that have a non-null ``key`` (and ``x``)."""
    xs, ys = [], []
    for r in rows:
        if r.get(key) is not None and r.get(x) is not None:
            xs.append(r[x])
            ys.append(r[key])
    return xs, ys
