"""LM benchmark: the demo's MoE LM (as a shared expert + top-1 of 32 experts) vs its dense baseline of equal active
parameters on the KJV corpus, trained side by side for a fixed number of steps. Headline figures:

- ``steps_ratio_to_dense_loss``: optimizer steps the MoE needs to reach the dense model's final validation
  loss, divided by the dense model's steps (goal <= 0.5; None when the MoE never reaches it);
- ``tokens_per_s_ratio``: MoE training tokens/s over dense tokens/s (goal >= 0.8).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "lm"
QUICK_MINUTES, FULL_MINUTES = 3.0, 9.0  # only when `minutes` is given: a wall-clock budget instead of steps
# A fixed number of optimizer steps: the headline is a ratio of steps, which must not shrink with machine load.
QUICK_STEPS, FULL_STEPS = 60, 300
# The demo's model with one shared expert plus top-1 of 32 routed experts (width 128 each): the same active FFN
# width per token as the demo's top-2 of 16 (2 x 128), so the same dense baseline; 33 experts instead of 16.
# Side by side over 60 steps (one seed) it beat top-2 of 16 and of 32, top-4 of 32 (width 64), and shared + top-1
# of 64; 2 shared + top-2 of 64 (width 64) learned a bit faster still but ran ~10% slower.
MOE_OVERRIDES = {"num_experts": 32, "k": 1, "num_shared_experts": 1}
GOALS = {"steps_ratio_to_dense_loss": ("<=", 0.5), "tokens_per_s_ratio": (">=", 0.8)}


def _meets(value: float | None, goal: tuple[str, float]) -> bool | None:
    if value is None:
        return None
    op, bound = goal
    return value <= bound if op == "<=" else value >= bound


def run_lm_bench(
    quick: bool = True,
    json_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    minutes: float | None = None,
    smoke: bool = False,
    seed: int = 0,
    quiet: bool = False,
    threads: int | None = None,
    tiny: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Train MoE and dense for the same number of steps (60 quick / 300 full; or as many as fit in ``minutes``
    when it is given) and return ``{"name", "summary", "cases", "environment", "goals", ...}``; written to
    ``json_path`` (and to ``benchmarks/results/lm.json`` when run from the repository root) with
    ``moekit.bench.common``.

    ``out_dir``: keep the runs' checkpoints and metrics there (default: a temporary folder, removed).
    ``smoke``: the tiny demo model for a few seconds (tests; its figures are not written to the repo copy).
    ``threads``: torch threads (None: torch's default). ``tiny``: same as ``smoke`` (the CLI's hidden
    ``--tiny``). ``console``: rich Console to print to.
    """
    from moekit.bench.common import environment, print_table, write_result
    from moekit.training.demo import check_minutes, compare, model_row, train_moe_and_dense
    from moekit.training.runs import torch_threads

    check_minutes(minutes)
    steps = None
    if minutes is None:
        steps = QUICK_STEPS if quick else FULL_STEPS
    t0 = time.perf_counter()
    smoke = smoke or tiny
    console = _Quiet() if quiet else console or _console()
    with tempfile.TemporaryDirectory(prefix="moekit-bench-lm-") as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        with torch_threads(threads):
            pair = train_moe_and_dense(
                out, minutes, smoke, seed, None, console, t0, moe_overrides=MOE_OVERRIDES, steps=steps
            )
    cmp = compare(pair.moe, pair.dense)
    cases = []
    for name, outcome in (("moe", pair.moe), ("dense", pair.dense)):
        row = model_row(name, outcome)
        if out_dir is None:  # the temporary folder is gone
            row.pop("checkpoint", None)
            row.pop("metrics", None)
        row["val_curve"] = [(r["step"], r["val_loss"]) for r in outcome.rows if r.get("val_loss") is not None]
        cases.append(row)
    summary = {
        "steps_ratio_to_dense_loss": cmp["steps_ratio_to_dense_loss"],
        "tokens_per_s_ratio": cmp["tokens_per_s_ratio"],
        "moe_steps_to_dense_loss": cmp["moe_steps_to_dense_loss"],
        "dense_steps": pair.dense.result.steps,
        "moe_final_val_loss": pair.moe.result.final_val_loss,
        "dense_final_val_loss": pair.dense.result.final_val_loss,
        "val_loss_delta": cmp["val_loss_delta"],
    }
    result = {
        "name": NAME,
        "quick": quick,
        "smoke": smoke,
        "minutes": minutes,
        "steps": pair.train_config.max_steps,
        "summary": summary,
        "goals": {
            key: {"goal": f"{op} {bound}", "met": _meets(summary[key], (op, bound))}
            for key, (op, bound) in GOALS.items()
        },
        "cases": cases,
        "train_config": pair.train_config.to_dict(),
        "calibration": pair.calibration,
        "elapsed_s": time.perf_counter() - t0,
        "environment": environment(threads),
    }
    report = write_result(NAME, result, json_path, repo_copy=not smoke)
    result["written"] = [str(p) for p in report.paths]
    if not quiet:
        rows = [[k, summary[k], result["goals"][k]["goal"], result["goals"][k]["met"]] for k in GOALS]
        title = "LM benchmark: MoE vs dense (equal active parameters)"
        print_table(title, ["metric", "value", "goal", "met"], rows, console=console)
        for note in report.notes:
            console.print(note)
    return result


class _Quiet:
    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def _console():  # noqa: ANN202
    from rich.console import Console

    return Console()
