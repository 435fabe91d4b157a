"""Hecto benchmark: heterogeneous GRU + FFN experts vs all-FFN, all-GRU and one dense GRU (equal parameters)
on verse -> Bible part, with where the top-1 gate sends verses. Writes ``benchmarks/results/hecto.json``."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from moekit.bench.common import environment, print_table, write_result

NAME = "hecto"


def run_hecto_bench(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    *,
    tiny: bool = False,
    console: Console | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``run_hecto_experiment``, print the tables, write the JSON result and return it."""
    from moekit.tabular.hecto import MODELS, run_hecto_experiment

    console = console or Console(width=150)
    mode = "tiny" if tiny else "quick" if quick else "full"
    console.print(f"[bold]hecto bench[/] ({mode}): training {', '.join(MODELS)} on verse -> Bible part ...")
    start = time.perf_counter()
    exp = run_hecto_experiment(quick=quick, tiny=tiny)
    summary = dict(exp["summary"], seconds=round(time.perf_counter() - start, 1))
    cases = [{"model": m, **exp["models"][m], "routing": exp["routing"].get(m)} for m in MODELS]
    result = {
        "name": NAME,
        "mode": mode,
        "summary": summary,
        "cases": cases,
        "parts": exp["parts"],
        "environment": environment(1),
        "config": dict(exp["config"], train_verses=exp["train_verses"], test_verses=exp["test_verses"]),
    }
    print_table(
        f"verse -> Bible part ({exp['test_verses']} held-out verses, chance {summary['chance']:.3f})",
        ["model", "accuracy", "params", "active params", "GRU-routed share", "train s"],
        [
            [
                c["model"],
                c["accuracy"],
                c["params"],
                c["active_params"],
                (c["routing"] or {}).get("gru_share"),
                c["train_seconds"],
            ]  # fmt: skip
            for c in cases
        ],
        console,
    )
    rt = exp["routing"]["hecto"]
    print_table(
        "Hecto gate: share of verses sent to a GRU expert",
        ["group", "verses", "GRU share", "acc (GRU-routed)", "acc (FFN-routed)"],
        [[f"part {p}", v["verses"], v["gru_share"], None, None] for p, v in rt["per_part"].items()]
        + [
            [f"length {k}", v["verses"], v["gru_share"], v["accuracy_gru_routed"], v["accuracy_ffn_routed"]]
            for k, v in rt["per_length_tokens"].items()
        ],
        console,
    )
    console.print(
        f"Hecto {summary['hecto_accuracy']:.4f}; best {summary['best_model']} "
        f"(Hecto minus best baseline: {summary['hecto_minus_best_baseline']:+.4f}). {summary['seconds']} s."
    )
    report = write_result(NAME, result, json_path, repo_copy=mode in ("quick", "full"), results_dir=results_dir)
    for path in report.paths:
        console.print(f"wrote {path}")
        _plot(result, path.with_suffix(".png"))
        console.print(f"wrote {path.with_suffix('.png')}")
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy per model, and the share of verses the Hecto gate sends to GRU experts; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.atomic_io import atomic_write_bytes

    cases = result["cases"]
    routing = cases[0]["routing"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.bar([c["model"] for c in cases], [c["accuracy"] for c in cases], color=["C3", "C0", "C1", "C2"])
    ax.axhline(result["summary"]["chance"], color="grey", ls="--", lw=0.8, label="chance")
    ax.set_ylabel("test accuracy")
    ax.set_title("verse -> Bible part (equal parameters)")
    ax.legend(fontsize=8)
    for ax, key, title in (
        (axes[1], "per_part", "GRU share per Bible part"),
        (axes[2], "per_length_tokens", "GRU share per verse length (BPE tokens)"),
    ):
        groups = routing[key]
        ax.bar(list(groups), [g["gru_share"] or 0.0 for g in groups.values()], color="C3")
        ax.axhline(routing["gru_share"], color="k", lw=0.8, ls=":", label="overall")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share routed to a GRU expert")
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
