"""``moekit compare-routers``: the same small MoE LM trained with each router on an equal budget (same data,
same initial seed, same number of optimizer steps), compared on validation loss, load balance, dead experts,
experts per token and throughput. A router whose module is not available is reported as skipped, with the
reason; a router that fails during training is reported as failed, and the others still run.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moekit.models import LMConfig
from moekit.training._io import atomic_write_json
from moekit.training.config import DataConfig, TrainConfig
from moekit.training.demo import demo_configs
from moekit.training.lockstep import train_lockstep
from moekit.training.plots import plot_bars, plot_loss_curves
from moekit.training.prepare import prepare_data
from moekit.training.report import image_section, markdown_table, write_report
from moekit.training.runs import (
    make_model,
    make_trainer,
    measure_step_seconds,
    routing_summary,
    torch_threads,
)

#: variant name -> (description, LMConfig overrides). "no aux": every auxiliary loss weight 0.
ROUTER_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "top2_aux": ("learned top-2 + load-balance/z aux losses", {"router": "topk", "k": 2}),
    "top2_noaux": ("learned top-2, no aux loss", {"router": "topk", "k": 2, "loss_weights": {}}),
    "switch": ("Switch top-1", {"router": "switch", "k": 1}),
    "hash": ("hash routing (fixed by token id)", {"router": "hash", "k": 2}),
    "sinkhorn": ("Sinkhorn-balanced top-2", {"router": "sinkhorn", "k": 2}),
    "expert_choice": ("expert choice (capacity k=2)", {"router": "expert_choice", "k": 2}),
    "dynmoe": ("DynMoE top-any", {"router": "dynmoe", "k": 2}),
    "aux_free_bias": ("aux-loss-free bias (DeepSeek-V3)", {"router": "deepseek", "k": 2}),
}
DEFAULT_MINUTES = 10.0
POST_SECONDS = 20.0  # plots and the report
COLUMNS = ["router", "status", "val loss", "load CV", "dead experts", "experts/token", "tokens/s", "steps"]


def variant_config(base: LMConfig, overrides: dict[str, Any]) -> LMConfig:
    """``base`` with a router variant's overrides (the dense FFN width is unchanged)."""
    return replace(base, **overrides)


def _check_buildable(config: LMConfig) -> str | None:
    """None when the model can be built, else why not (missing router module, rejected options)."""
    try:
        make_model(config, seed=0)
    except ImportError as exc:
        return f"router module not available: {exc}"
    except (ValueError, TypeError) as exc:
        return f"cannot build: {exc}"
    return None


def run_compare_routers(
    out_dir: str | Path = "moekit-routers",
    minutes: float | None = None,
    steps: int | None = None,
    smoke: bool = False,
    seed: int = 0,
    routers: list[str] | None = None,
    progress: bool | None = None,
    quiet: bool = False,
    threads: int | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Train one model per router variant (``routers``: names in `ROUTER_VARIANTS`, default all) for the
    same number of steps: ``steps``, or as many as fit ``minutes`` (default 10) by timing the first variant.
    Writes ``compare_routers.json``, ``routers.png``, ``routers_loss.png``, ``routers.md`` to ``out_dir``.
    ``threads``: torch threads for the run (None: torch's default). ``console``: rich Console to print to."""
    with torch_threads(threads):
        return _compare(
            out_dir, minutes, steps, smoke, seed, routers, progress, None if quiet else console or _console()
        )


def _compare(
    out_dir: str | Path,
    minutes: float | None,
    steps: int | None,
    smoke: bool,
    seed: int,
    routers: list[str] | None,
    progress: bool | None,
    console: Any,
) -> dict[str, Any]:
    labels = list(ROUTER_VARIANTS) if routers is None else list(routers)
    unknown = [r for r in labels if r not in ROUTER_VARIANTS]
    if unknown:
        raise ValueError(f"unknown router variant(s) {unknown}; choose from {list(ROUTER_VARIANTS)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1 or None, got {steps!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    vocab = 384 if smoke else 2048
    base, train_cfg, data_cfg = demo_configs(vocab, smoke)
    if not smoke:
        base = replace(base, n_layers=2)  # a smaller model: 8 runs share the budget
        data_cfg = DataConfig(vocab_size=vocab)
    train_cfg = replace(train_cfg, seed=seed)
    data = prepare_data(data_cfg, train_cfg, out)
    base = replace(base, vocab_size=data.vocab_size)

    configs: dict[str, LMConfig] = {}
    results: dict[str, dict[str, Any]] = {}
    for label in labels:
        cfg = None
        try:
            cfg = variant_config(base, ROUTER_VARIANTS[label][1])
        except (ValueError, TypeError) as exc:
            reason = f"invalid config: {exc}"
        else:
            reason = _check_buildable(cfg)
        if reason is None:
            configs[label] = cfg
        else:
            results[label] = {
                "status": "skipped",
                "reason": reason,
                "router": ROUTER_VARIANTS[label]["router"],
            }
    budget = 60.0 * (minutes if minutes is not None else DEFAULT_MINUTES)
    time_limit = None
    if steps is None:
        if smoke:
            steps = train_cfg.max_steps
        else:
            remaining = budget - (time.perf_counter() - t0) - POST_SECONDS
            steps = _steps_for_budget(configs, train_cfg, data, seed, remaining)
            time_limit = max(budget - (time.perf_counter() - t0) - POST_SECONDS, 1.0)
    train_cfg = replace(train_cfg, max_steps=steps, eval_every=max(1, steps // 10), warmup_steps=max(1, steps // 10))
    if console is not None:
        for label in configs:
            console.print(f"[bold]{label}[/]: {ROUTER_VARIANTS[label][0]}")
        console.print(f"{len(configs)} routers x {steps} steps, trained in alternation")
    trainers = {
        label: make_trainer(label, cfg, train_cfg, data, out / label, seed, progress) for label, cfg in configs.items()
    }
    failures: dict[str, str] = {}
    outcomes = train_lockstep(trainers, max_seconds=time_limit, overwrite=True, progress=progress, failures=failures)
    rows_by_label: dict[str, list[dict[str, Any]]] = {}
    for label, cfg in configs.items():
        if label in failures:
            results[label] = {"status": "failed", "reason": failures[label], "router": cfg.router}
            continue
        r = outcomes[label]
        results[label] = {
            "status": "ok",
            "router": cfg.router,
            "k": cfg.k,
            "final_val_loss": r.final_val_loss,
            "tokens_per_s": r.tokens_per_s,
            "steps": r.steps,
            "stopped_early": r.stopped_early,
            "train_time_s": r.train_time,
            "params_active": r.param_counts.get("active"),
            **routing_summary(r),
        }
        rows_by_label[label] = trainers[label].history
    ordered = {label: results[label] for label in labels}
    summary = {
        "out_dir": str(out),
        "steps": steps,
        "seed": seed,
        "train_config": train_cfg.to_dict(),
        "base_model": base.to_dict(),
        "routers": ordered,
        "elapsed_s": time.perf_counter() - t0,
    }
    files = _write_outputs(out, ordered, rows_by_label, summary)
    summary["files"] = files
    atomic_write_json(out / "compare_routers.json", summary)
    if console is not None:
        _print(console, ordered, steps)
    return summary


def _steps_for_budget(
    configs: dict[str, LMConfig], train_cfg: TrainConfig, data: Any, seed: int, remaining_s: float
) -> int:
    """Steps per router so that all of them fit ``remaining_s``, from a timing of the first variant."""
    if not configs:
        return 1
    step_s = measure_step_seconds(next(iter(configs.values())), train_cfg, data, seed)
    # Routers differ in cost (Sinkhorn iterations, DynMoE's variable k): a 35% margin; ~10 evals: +10%.
    return max(10, int(remaining_s / len(configs) / (step_s * 1.35 * 1.1)))


def _table_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for label, r in results.items():
        if r["status"] != "ok":
            rows.append([label, f"{r['status']}: {r['reason']}", None, None, None, None, None, None])
            continue
        row = [label, "ok", r["final_val_loss"], r.get("load_cv"), r.get("dead_experts")]
        rows.append(row + [r.get("experts_per_token"), r["tokens_per_s"], r["steps"]])
    return rows


def _write_outputs(out: Path, results, rows_by_label, summary) -> dict[str, str]:  # noqa: ANN001
    files: dict[str, str] = {}
    ok = [label for label, r in results.items() if r["status"] == "ok"]
    if ok:
        metrics = {
            "val loss": [results[x]["final_val_loss"] for x in ok],
            "load CV (last window)": [results[x].get("load_cv") for x in ok],
            "dead experts (all layers)": [results[x].get("dead_experts") for x in ok],
            "mean experts per token": [results[x].get("experts_per_token") for x in ok],
            "tokens/s": [results[x]["tokens_per_s"] for x in ok],
        }
        files["bars"] = str(plot_bars(ok, metrics, out / "routers.png", f"Routers, {summary['steps']} steps each"))
        files["loss"] = str(plot_loss_curves(rows_by_label, out / "routers_loss.png"))
    table = markdown_table(COLUMNS, [[_fmt_cell(v) for v in row] for row in _table_rows(results)])
    write_report(
        out / "routers.md",
        "moekit compare-routers",
        [
            f"Same model ({summary['base_model']['n_layers']} layers, {summary['base_model']['num_experts']} "
            f"experts), same data and seed, {summary['steps']} optimizer steps per router. Load CV, dead "
            "experts and experts/token are over the last evaluation window of training.",
            table,
            image_section("Plots", {"Router metrics": files.get("bars", ""), "Loss": files.get("loss", "")}, out),
        ],
    )
    files["report"] = str(out / "routers.md")
    return files


def _fmt_cell(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def _console():  # noqa: ANN202
    from rich.console import Console

    return Console()


def _print(console, results, steps: int) -> None:  # noqa: ANN001
    from rich.table import Table

    from moekit.training.report import fmt

    table = Table(title=f"Routers on an equal budget ({steps} steps each)")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in _table_rows(results):
        table.add_row(*(fmt(v) for v in row))
    console.print(table)
