"""TabMoE benchmark: functional table experts behind a hard-EM-trained question router, vs an oracle router and
a single generalist network, per operation and on held-out question templates. Writes
``benchmarks/results/tabmoe.json``."""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console

from moekit.bench.common import environment, print_table, write_result

NAME = "tabmoe"
SYSTEMS = ("tabmoe", "oracle", "generalist")


def run_tabmoe_bench(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    *,
    tiny: bool = False,
    console: Console | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``run_tabmoe_experiment``, print the tables, write the JSON result and return it."""
    from moekit.tabular.tabmoe import OPS, run_tabmoe_experiment

    console = console or Console(width=150)
    mode = "tiny" if tiny else "quick" if quick else "full"
    console.print(f"[bold]tabmoe bench[/] ({mode}): generating tables and questions, training ...")
    start = time.perf_counter()
    exp = run_tabmoe_experiment(quick=quick, tiny=tiny)
    summary = dict(exp["summary"], seconds=round(time.perf_counter() - start, 1))
    cases = [
        {"system": s, "split": split, **exp["systems"][s][split]} for s in SYSTEMS for split in ("seen", "held_out")
    ]
    result = {
        "name": NAME,
        "mode": mode,
        "summary": summary,
        "cases": cases,
        "routing": exp["routing"],
        "em_history": exp["em_history"],
        "templates": exp["templates"],
        "examples": exp["examples"],
        "environment": environment(1),
        "config": exp["config"],
    }
    rows = []
    for c in cases:
        rows.append([c["system"], c["split"], c["accuracy"], *(c["per_op"].get(op) for op in OPS)])
    print_table(
        "table QA accuracy (seen templates / held-out templates)", ["system", "split", "all", *OPS], rows, console
    )
    console.print(
        f"router picks the true operation on {summary['router_accuracy']:.3f} (seen) / "
        f"{summary['router_held_out_accuracy']:.3f} (held-out templates); last E-step picks correct on "
        f"{summary['em_pick_accuracy']:.3f} of training questions. {summary['seconds']} s."
    )
    report = write_result(NAME, result, json_path, repo_copy=mode in ("quick", "full"), results_dir=results_dir)
    for path in report.paths:
        console.print(f"wrote {path}")
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    return result
