"""Helpers every benchmark shares: timing, interleaved comparison, environment, rich tables, JSON results.

A benchmark measures candidates with ``time_interleaved`` (round-robin repeats, so machine noise hits all
candidates alike), prints ``print_table`` and saves ``{"name", "summary", "cases", "environment", ...}`` with
``write_result``: to ``--json PATH`` and to ``benchmarks/results/NAME.json`` under the current directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from moekit.atomic_io import atomic_write_text

RESULTS_DIR = Path("benchmarks") / "results"


CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class TimingConfig:
    """How to time: ``warmup`` untimed calls, then ``repeats`` timed ones, with ``threads`` torch threads.

    ``clock="wall"`` measures elapsed time; ``clock="cpu"`` the CPU time of this process (all its threads), which
    other programs on a shared machine barely disturb. Use ``"cpu"`` with ``threads=1`` (idle worker threads
    that spin would count too); with one thread on an idle machine the two agree.
    """

    warmup: int = 1
    repeats: int = 5
    threads: int | None = None
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup}, {self.repeats}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {self.clock!r}")


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of one callable, in milliseconds."""

    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": round(self.median_ms, 3),
            "min_ms": round(self.min_ms, 3),
            "times_ms": [round(t, 3) for t in self.times_ms],
        }


@dataclass(frozen=True)
class Measurement:
    """Result of ``time_interleaved``: timings of the candidates that ran, errors of those that failed."""

    timings: dict[str, Timing]
    failed: dict[str, str] = field(default_factory=dict)


@contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: leave as is); restores the old value."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _timed(fn: Callable[[], object], clock: str = "wall") -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    fn()
    return (now() - start) * 1e3


def time_callable(fn: Callable[[], object], config: TimingConfig = TimingConfig()) -> Timing:
    """Time ``fn()``: ``config.warmup`` untimed calls, then ``config.repeats`` timed calls."""
    with num_threads(config.threads):
        for _ in range(config.warmup):
            fn()
        return Timing(tuple(_timed(fn, config.clock) for _ in range(config.repeats)))


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    config: TimingConfig = TimingConfig(),
    on_error: tuple[type[BaseException], ...] = (RuntimeError, NotImplementedError, ValueError, TypeError),
    progress: Callable[[str], None] | None = None,
) -> Measurement:
    """Time several candidates round-robin: repeat r times each candidate once, in rotating order.

    A candidate raising one of ``on_error`` (during warmup or a timed call) is dropped and its error recorded.
    ``progress`` gets a line after the warmup and after each round (long runs show they are alive).
    """
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    failed: dict[str, str] = {}

    def attempt(name: str, timed: bool) -> None:
        try:
            elapsed = _timed(candidates[name], config.clock)
        except on_error as exc:
            failed[name] = f"{type(exc).__name__}: {exc}".strip()[:500]
            return
        if timed:
            samples[name].append(elapsed)

    with num_threads(config.threads):
        for _ in range(config.warmup):
            for name in names:
                if name not in failed:
                    attempt(name, timed=False)
        if progress is not None:
            progress(f"warmup done ({config.warmup} per candidate)")
        for r in range(config.repeats):
            shift = r % max(len(names), 1)  # rotate so no candidate always runs first (caches, turbo)
            for name in names[shift:] + names[:shift]:
                if name not in failed:
                    attempt(name, timed=True)
            if progress is not None:
                progress(f"round {r + 1}/{config.repeats} done")
    timings = {name: Timing(tuple(samples[name])) for name in names if name not in failed}
    return Measurement(timings, failed)


def profile_callable(fn: Callable[[], object], row_limit: int = 15, warmup: int = 1) -> list[dict[str, Any]]:
    """Run ``fn`` once under ``torch.profiler`` (after ``warmup`` calls); top ops by CPU self time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:row_limit]
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count,
        }
        for e in top
    ]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(threads: int | None = None) -> dict[str, Any]:
    """Where the numbers came from: versions, threads, CPU, load, date (UTC)."""
    import moekit

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "moekit_version": moekit.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import transformers

        env["transformers_version"] = transformers.__version__
    except ImportError:
        env["transformers_version"] = None
    if hasattr(os, "getloadavg"):
        env["load_average_1m"] = round(os.getloadavg()[0], 2)  # > cpu_count means a noisy machine
    return env


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    console: Console | None = None,
    caption: str | None = None,
) -> Table:
    """Print rows as a rich table (numbers right-aligned); returns the table."""
    table = Table(title=title, caption=caption)
    for i, col in enumerate(columns):
        numeric = bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
        table.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    (console or Console()).print(table)
    return table


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 0.1 else f"{value:,.2f}"
    return str(value)


@dataclass(frozen=True)
class WriteReport:
    """Where ``write_result`` wrote, and why it skipped a copy."""

    paths: tuple[Path, ...]
    notes: tuple[str, ...] = ()


def write_result(
    name: str,
    result: Mapping[str, Any],
    json_path: str | os.PathLike | None = None,
    repo_copy: bool = True,
    results_dir: str | os.PathLike | None = None,
) -> WriteReport:
    """Write ``result`` as JSON (atomically) to ``json_path`` and to ``<results_dir>/NAME.json``.

    ``results_dir`` defaults to ``./benchmarks/results`` (the repository's, when run from its root); that
    copy is skipped with a note when the folder does not exist or ``repo_copy`` is False.
    """
    for key in ("summary", "cases", "environment"):
        if key not in result:
            raise ValueError(f"benchmark result must have a {key!r} entry")
    text = json.dumps(result, indent=2, sort_keys=False, default=_json_default) + "\n"
    paths: list[Path] = []
    notes: list[str] = []
    if json_path is not None:
        paths.append(atomic_write_text(json_path, text))
    target_dir = Path(results_dir) if results_dir is not None else Path.cwd() / RESULTS_DIR
    if not repo_copy:
        notes.append(f"not written to {target_dir / f'{name}.json'} (this run's figures are not the reference)")
    elif target_dir.is_dir():
        repo_path = (target_dir / f"{name}.json").resolve()
        if not any(p.resolve() == repo_path for p in paths):
            paths.append(atomic_write_text(repo_path, text))
    else:
        notes.append(f"no {target_dir} folder here (run from the repository root to update it); copy skipped")
    return WriteReport(tuple(paths), tuple(notes))


def _json_default(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
