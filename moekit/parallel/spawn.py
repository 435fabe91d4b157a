"""Run a function on N local CPU ranks (gloo over loopback) with a hard deadline, for tests and benchmarks.

``spawn_ranks(fn, world_size, args)`` starts ``world_size`` processes from a fork server that has imported
torch once (so later spawns start in well under a second), initialises a gloo process group on 127.0.0.1
through a ``FileStore`` in a temporary directory (no port to pick), calls ``fn(rank, world_size, *args)`` and
returns the per-rank results (round-tripped through JSON). A rank that raises or dies makes ``spawn_ranks``
raise ``RankFailure`` with that rank's traceback; ranks still running after ``timeout_s`` are killed and
``TimeoutError`` is raised. Nothing started here can hang the caller. Real runs use torchrun (see
``moekit.parallel.launch``).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.device_mesh",
    "safetensors.torch",
    "moekit.layer",
    "moekit.models",
    "moekit.parallel.launch",
    "moekit.parallel.train_lm",
    "moekit.training.prepare",
    "moekit.data",
]


class RankFailure(RuntimeError):
    """One or more spawned ranks raised or exited with a non-zero status."""


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Hide where ``__main__`` came from while ranks start: they run an importable function and must not
    re-run the caller's script (which may lack an ``if __name__ == "__main__"`` guard)."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            if k == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[k]
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _entry(fn: Callable, rank: int, world: int, args: tuple, tmp: str, pg_timeout_s: float, threads: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    out = Path(tmp)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world, *args)
        (out / f"result-{rank}.json").write_text(json.dumps(result))
    except BaseException:
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)  # no destroy_process_group: the peers may be gone
    dist.destroy_process_group()


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 60.0,
    pg_timeout_s: float = 30.0,
    threads: int = 1,
    grace_s: float = 5.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; returns each rank's JSON-able result
    (None for a rank that exited with status 0 without returning).

    ``fn`` must be importable by name (a module-level function, not one in ``__main__``). ``pg_timeout_s``
    bounds each collective, ``timeout_s`` the whole run; ``grace_s`` is how long the other ranks get to exit
    after one failed.
    """
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="moekit-ranks-") as tmp:
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, args, tmp, pg_timeout_s, threads), daemon=True)
            for r in range(world_size)
        ]
        with _main_not_reimported():
            for p in procs:
                p.start()
        deadline = time.monotonic() + timeout_s
        failed_at: float | None = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                break
            time.sleep(0.02)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        errors = {r: Path(tmp) / f"error-{r}.txt" for r in range(world_size)}
        errors = {r: f.read_text() for r, f in errors.items() if f.is_file()}
        bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0 and r not in hung}
        if bad:
            details = "\n".join(f"--- rank {r} ---\n{errors.get(r, f'exit code {code}')}" for r, code in bad.items())
            killed = f" (ranks {hung} were killed afterwards)" if hung else ""
            raise RankFailure(f"ranks {sorted(bad)} of {world_size} failed{killed}:\n{details}")
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout_s} s and were killed")
        files = [Path(tmp) / f"result-{r}.json" for r in range(world_size)]
        return [json.loads(f.read_text()) if f.is_file() else None for f in files]
