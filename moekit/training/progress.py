"""A rich progress bar (loss, tokens/s, ETA) that is a no-op when not on a terminal or under pytest."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_enabled(requested: bool | None) -> bool:
    """``requested`` if given, else on only for an interactive terminal outside pytest."""
    if requested is not None:
        return bool(requested)
    return sys.stdout.isatty() and "PYTEST_CURRENT_TEST" not in os.environ


class TrainProgress:
    """``with TrainProgress(total, name, enabled) as p: p.update(step, loss=..., tokens_per_s=...)``."""

    def __init__(self, total: int, description: str, enabled: bool, completed: int = 0) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._total, self._description, self._completed = total, description, completed

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                self._description, total=self._total, completed=self._completed, loss="-", tps="-"
            )
        return self

    def update(self, completed: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self._progress is None:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        if tokens_per_s is not None:
            fields["tps"] = f"{tokens_per_s:,.0f}"
        self._progress.update(self._task, completed=completed, **fields)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
