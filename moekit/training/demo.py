"""``moekit demo``: train a small MoE LM and its dense baseline (equal active parameters) on the bundled KJV
Bible within a wall-clock budget, then write checkpoints, metrics, plots, an expert-specialization report and
``report.md``, print a summary table and a sample generation.

Budget: after data preparation, a few steps of each model are timed and the step count (the length of the
cosine schedule) is sized so that both runs, their evaluations and the report fit in the remaining time.
The two models then train in alternation, one step each (`train_lockstep`), so they see the same machine
conditions and, should the machine slow down, stop at the same step (reported as ``stopped_early``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moekit.models import LMConfig
from moekit.training._io import atomic_write_json
from moekit.training.config import DataConfig, TrainConfig
from moekit.training.lockstep import train_lockstep
from moekit.training.plots import plot_loss_curves, plot_routing_curves
from moekit.training.prepare import PreparedData, prepare_data
from moekit.training.report import fmt, image_section, markdown_table, write_report
from moekit.training.runs import (
    RunOutcome,
    make_trainer,
    measure_step_seconds,
    routing_summary,
    steps_to_reach,
    torch_threads,
)
from moekit.training.specialization import analyze_specialization, specialization_markdown

DEFAULT_MINUTES = 9.0  # total wall-clock target of the default demo (<= 10 minutes on 2 CPU cores)
PROMPT = "And God said,"
POST_SECONDS = 25.0  # reserved for specialization, plots, report and generation
MIN_STEPS, MAX_STEPS = 20, 20000


def demo_configs(vocab_size: int, smoke: bool) -> tuple[LMConfig, TrainConfig, DataConfig]:
    """The MoE model, training and data settings of the demo (``max_steps`` is set from the budget)."""
    if smoke:
        model = LMConfig(
            vocab_size=vocab_size,
            d_model=32,
            n_layers=2,
            n_heads=2,
            d_ff=32,
            num_experts=4,
            k=2,
            max_seq_len=32,
        )
        train = TrainConfig(
            max_steps=8, batch_size=4, block_size=32, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
            keep_last=1,
        )  # fmt: skip
        data = DataConfig(vocab_size=vocab_size, chapter_stride=40, val_every=4)
        return model, train, data
    model = LMConfig(
        vocab_size=vocab_size,
        d_model=128,
        n_layers=4,
        n_heads=4,
        d_ff=128,
        # One shared expert + top-1 of 32 routed: the same active FFN width (256) as top-2 of 16, but it reached
        # the dense model's loss in fewer steps (moekit.bench.lm: a side-by-side search of 6 layouts).
        num_experts=32,
        k=1,
        num_shared_experts=1,
        max_seq_len=128,
    )
    train = TrainConfig(
        max_steps=300, batch_size=16, block_size=128, lr=2e-3, warmup_steps=30, eval_every=25, eval_batches=8,
        keep_last=1,
    )  # fmt: skip
    return model, train, DataConfig(vocab_size=vocab_size)


def plan_steps(
    remaining_s: float, moe_step_s: float, dense_step_s: float, train: TrainConfig, evals: int = 20
) -> tuple[int, int]:
    """(max_steps, eval_every) so that both runs, with about ``evals`` evaluations each, fit in
    ``remaining_s``. An evaluation (``eval_batches`` forward passes of one micro-batch) costs about
    ``eval_batches / (3 * grad_accum)`` training steps. At least `MIN_STEPS` steps, one evaluation per 5."""
    per_step = moe_step_s + dense_step_s  # one step of each model
    eval_s = per_step * train.eval_batches / (3 * train.grad_accum)  # one evaluation of each model
    steps = int((0.92 * remaining_s - evals * eval_s) / per_step)
    steps = max(MIN_STEPS, min(MAX_STEPS, steps))
    evals = max(1, min(evals, steps // 5))
    return steps, max(1, steps // evals)


def _generate(outcome: RunOutcome, data: PreparedData, seed: int, max_new_tokens: int) -> dict[str, Any]:
    import torch

    tok = data.tokenizer
    ids = tok.encode(PROMPT)
    room = outcome.model.config.max_seq_len - len(ids)
    n = max(0, min(max_new_tokens, room))
    out = outcome.model.generate(torch.tensor([ids]), n, temperature=0.8, top_p=0.95, seed=seed)
    return {"prompt": PROMPT, "text": tok.decode(out[0].tolist()), "new_tokens": n}


def model_row(name: str, outcome: RunOutcome) -> dict[str, Any]:
    r = outcome.result
    val = r.final_val_loss
    return {
        "name": name,
        "steps": r.steps,
        "final_val_loss": val,
        "perplexity": math.exp(val) if val is not None and val < 50 else None,
        "final_train_loss": r.final_train_loss,
        "tokens_per_s": r.tokens_per_s,
        "train_time_s": r.train_time,
        "wall_time_s": r.wall_time,
        "tokens": r.tokens,
        "params_total": r.param_counts.get("total"),
        "params_active": r.param_counts.get("active"),
        "stopped_early": r.stopped_early,
        "routing": routing_summary(r),
        "model_config": outcome.model.config.to_dict(),
        "checkpoint": r.checkpoint,
        "metrics": r.metrics_path,
    }


def compare(moe: RunOutcome, dense: RunOutcome) -> dict[str, Any]:
    """MoE vs dense: steps for the MoE to reach the dense final val loss, and the throughput ratio."""
    target = dense.result.final_val_loss
    reach = steps_to_reach(moe.rows, target)
    d_steps = dense.result.steps
    m_tps, d_tps = moe.result.tokens_per_s, dense.result.tokens_per_s
    m_val = moe.result.final_val_loss
    return {
        "dense_final_val_loss": target,
        "moe_steps_to_dense_loss": reach,
        "steps_ratio_to_dense_loss": reach / d_steps if reach is not None and d_steps else None,
        "tokens_per_s_ratio": m_tps / d_tps if m_tps and d_tps else None,
        "val_loss_delta": m_val - target if m_val is not None and target is not None else None,
    }


@dataclass
class PairOutcome:
    """The MoE and dense runs of a demo or benchmark, with the data and the settings they used."""

    moe: RunOutcome
    dense: RunOutcome
    data: PreparedData
    train_config: TrainConfig
    calibration: dict[str, float] | None
    budget_s: float


def train_moe_and_dense(
    out: Path,
    minutes: float | None,
    smoke: bool,
    seed: int,
    progress: bool | None,
    console: Any,
    t0: float,
    moe_overrides: dict[str, Any] | None = None,
    steps: int | None = None,
) -> PairOutcome:
    """Prepare the KJV data, size the step count to the budget, train the MoE model and its dense baseline.

    ``moe_overrides``: `LMConfig` fields to change in the demo's MoE model; they must keep its active
    parameters (``k * d_ff``), since the dense baseline is derived from it (the LM benchmark uses more experts).
    ``steps``: train exactly that many steps (no calibration, no time limit; ``minutes`` is ignored), so that
    step-based figures do not depend on how busy the machine is."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < MIN_STEPS):
        raise ValueError(f"steps must be an int >= {MIN_STEPS} or None, got {steps!r}")
    budget = 60.0 * (minutes if minutes is not None else DEFAULT_MINUTES)
    vocab = 384 if smoke else 2048
    model_cfg, train_cfg, data_cfg = demo_configs(vocab, smoke)
    if moe_overrides and not smoke:
        model_cfg = replace(model_cfg, **moe_overrides)
    train_cfg = replace(train_cfg, seed=seed)
    data = prepare_data(data_cfg, train_cfg, out)
    model_cfg = replace(model_cfg, vocab_size=data.vocab_size)
    dense_cfg = model_cfg.dense_baseline()
    console.print(
        f"data: {data.source}, {len(data.train_stream):,} training / {len(data.val_stream):,} validation "
        f"tokens, BPE vocab {data.vocab_size} ({time.perf_counter() - t0:.1f}s)"
    )
    calibration = None
    if steps is not None and not smoke:
        warmup = max(1, min(100, steps // 10))
        train_cfg = replace(train_cfg, max_steps=steps, eval_every=max(1, steps // 12), warmup_steps=warmup)
        console.print(f"{steps} steps each (eval every {train_cfg.eval_every}); the two models train in alternation")
        time_limit = None
    elif not smoke:
        moe_s = measure_step_seconds(model_cfg, train_cfg, data, seed)
        dense_s = measure_step_seconds(dense_cfg, train_cfg, data, seed)
        remaining = budget - (time.perf_counter() - t0) - POST_SECONDS
        steps, eval_every = plan_steps(remaining, moe_s, dense_s, train_cfg)
        warmup = max(1, min(100, steps // 10))
        train_cfg = replace(train_cfg, max_steps=steps, eval_every=eval_every, warmup_steps=warmup)
        calibration = {"moe_step_s": moe_s, "dense_step_s": dense_s, "remaining_s": remaining, "steps": steps}
        console.print(
            f"calibration: MoE {moe_s:.3f}s/step, dense {dense_s:.3f}s/step -> {steps} steps each "
            f"(eval every {eval_every}); the two models train in alternation"
        )
        time_limit = max(remaining, 1.0)
    else:
        time_limit = None
    trainers = {
        "moe": make_trainer("moe", model_cfg, train_cfg, data, out / "moe", seed, progress),
        "dense": make_trainer("dense", dense_cfg, train_cfg, data, out / "dense", seed, progress),
    }
    results = train_lockstep(trainers, max_seconds=time_limit, overwrite=True, progress=progress)
    moe, dense = (RunOutcome(trainers[n].model, trainers[n], results[n]) for n in ("moe", "dense"))
    return PairOutcome(moe, dense, data, train_cfg, calibration, budget)


def run_demo(
    out_dir: str | Path = "moekit-demo",
    minutes: float | None = None,
    smoke: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    quiet: bool = False,
    threads: int | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Train the demo MoE LM and its dense baseline; write everything to ``out_dir``; return the summary.

    ``minutes``: total wall-clock budget (default 9; the step count is sized to fit). ``smoke``: a tiny model
    on a slice of the corpus for a few seconds (tests). ``quiet``: print nothing. ``threads``: torch threads
    for the run (None: torch's default, one per core). ``console``: a rich Console to print to (default: a new
    one on stdout). Re-running into the same ``out_dir`` replaces the
    previous demo's checkpoints and outputs.
    """
    check_minutes(minutes)
    with torch_threads(threads):
        return _run_demo(Path(out_dir), minutes, smoke, seed, progress, _console(quiet, console))


def _run_demo(
    out_dir: Path, minutes: float | None, smoke: bool, seed: int, progress: bool | None, console: Any
) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = 60.0 * (minutes if minutes is not None else DEFAULT_MINUTES)
    console.print(f"[bold]moekit demo[/] -> {out} (budget {budget / 60:.1f} min{', smoke' if smoke else ''})")
    pair = train_moe_and_dense(out, minutes, smoke, seed, progress, console, t0)
    moe, dense, data = pair.moe, pair.dense, pair.data
    summary: dict[str, Any] = {
        "out_dir": str(out),
        "seed": seed,
        "smoke": smoke,
        "budget_s": pair.budget_s,
        "calibration": pair.calibration,
        "data": {
            "source": data.source,
            "vocab_size": data.vocab_size,
            "train_tokens": len(data.train_stream),
            "val_tokens": len(data.val_stream),
            "val_tokens_scored": sum(int(b.targets.numel()) for b in data.val_batches),
        },
        "train_config": pair.train_config.to_dict(),
        "models": {"moe": model_row("moe", moe), "dense": model_row("dense", dense)},
        "comparison": compare(moe, dense),
    }
    files = _write_outputs(out, moe, dense, data, summary)
    summary["sample"] = _generate(moe, data, seed, 24 if smoke else 80)
    summary["elapsed_s"] = time.perf_counter() - t0
    summary["files"] = files
    _write_report(out, summary, files)
    atomic_write_json(out / "summary.json", summary)
    _print_summary(console, summary)
    return summary


def check_minutes(minutes: float | None) -> None:
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes < math.inf
    ):
        raise ValueError(f"minutes must be a number > 0 or None, got {minutes!r}")


def _write_outputs(
    out: Path, moe: RunOutcome, dense: RunOutcome, data: PreparedData, summary: dict[str, Any]
) -> dict[str, str]:
    files: dict[str, str] = {}
    files["loss_curves"] = str(plot_loss_curves({"MoE": moe.rows, "dense": dense.rows}, out / "loss_curves.png"))
    files["routing_curves"] = str(
        plot_routing_curves(moe.rows, out / "routing_curves.png", "MoE routing over training (mean over layers)")
    )
    monitor = moe.trainer.monitor
    if monitor is not None:
        files["load_heatmap"] = str(monitor.plot_load_heatmap(out / "load_heatmap.png"))
        files["router_entropy"] = str(monitor.plot_entropy(out / "router_entropy.png"))
    spec = analyze_specialization(moe.model, data.val_batches, data.tokenizer, data.part_names)
    files["specialization_json"] = str(atomic_write_json(out / "specialization.json", spec))
    summary["specialization_markdown"] = specialization_markdown(spec)
    return files


def _write_report(out: Path, summary: dict[str, Any], files: dict[str, str]) -> Path:
    m, d, c = summary["models"]["moe"], summary["models"]["dense"], summary["comparison"]
    rows = [
        ("final val loss", m["final_val_loss"], d["final_val_loss"]),
        ("perplexity", m["perplexity"], d["perplexity"]),
        ("steps", m["steps"], d["steps"]),
        ("tokens/s (training)", m["tokens_per_s"], d["tokens_per_s"]),
        ("training time (s)", m["train_time_s"], d["train_time_s"]),
        ("params total", m["params_total"], d["params_total"]),
        ("params active / token", m["params_active"], d["params_active"]),
        ("load CV (last window)", m["routing"].get("load_cv"), None),
        ("dead experts", m["routing"].get("dead_experts"), None),
        ("stopped early (time)", m["stopped_early"], d["stopped_early"]),
    ]
    reach = c["moe_steps_to_dense_loss"]
    headline = (
        f"The MoE reached the dense model's final validation loss ({fmt(c['dense_final_val_loss'])}) after "
        f"{reach} of {d['steps']} steps (ratio {fmt(c['steps_ratio_to_dense_loss'], '.2f')})."
        if reach is not None
        else f"The MoE did not reach the dense model's final validation loss "
        f"({fmt(c['dense_final_val_loss'])}) within {m['steps']} steps."
    )
    intro = (
        f"Small MoE LM vs its dense baseline of equal active parameters on {summary['data']['source']} "
        f"({summary['data']['train_tokens']:,} training tokens, BPE vocab {summary['data']['vocab_size']}). "
        f"{headline} Throughput ratio MoE / dense: {fmt(c['tokens_per_s_ratio'], '.2f')}. "
        f"Whole demo: {summary['elapsed_s']:.0f} s."
    )
    sample = summary["sample"]
    sections = [
        intro,
        "## Summary\n\n" + markdown_table(["", "MoE", "dense"], rows),
        image_section(
            "Plots",
            {
                "Loss vs steps and wall-clock": files.get("loss_curves", ""),
                "Expert load over training": files.get("load_heatmap", ""),
                "Router entropy": files.get("router_entropy", ""),
                "Routing statistics (entropy, load CV, dropped and zero-expert shares)": files.get(
                    "routing_curves", ""
                ),
            },
            out,
        ),
        summary["specialization_markdown"],
        f"## Sample (MoE, temperature 0.8, top-p 0.95)\n\n```text\n{sample['text']}\n```\n",
        "## Configuration\n\n```json\n" + _json(summary["models"]["moe"]["model_config"]) + "\n```\n\n"
        "```json\n" + _json(summary["train_config"]) + "\n```\n",
    ]
    return write_report(out / "report.md", "moekit demo: MoE vs dense on the KJV Bible", sections)


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1)


class _Quiet:
    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def _console(quiet: bool, console: Any = None) -> Any:
    """Where to print: nothing when ``quiet``, else ``console`` or a new rich Console."""
    if quiet:
        return _Quiet()
    if console is not None:
        return console
    from rich.console import Console

    return Console()


def _print_summary(console: Any, summary: dict[str, Any]) -> None:
    if isinstance(console, _Quiet):
        return
    from rich.table import Table

    m, d, c = summary["models"]["moe"], summary["models"]["dense"], summary["comparison"]
    table = Table(title="MoE vs dense (equal active parameters)")
    table.add_column("")
    table.add_column("MoE", justify="right")
    table.add_column("dense", justify="right")
    table.add_row("val loss", fmt(m["final_val_loss"]), fmt(d["final_val_loss"]))
    table.add_row("perplexity", fmt(m["perplexity"], ".1f"), fmt(d["perplexity"], ".1f"))
    table.add_row("steps", fmt(m["steps"]), fmt(d["steps"]))
    reach = c["moe_steps_to_dense_loss"]
    table.add_row(
        "steps to dense final val loss",
        "not reached" if reach is None else f"{reach} ({fmt(c['steps_ratio_to_dense_loss'], '.2f')}x)",
        fmt(d["steps"]),
    )
    table.add_row("tokens/s", fmt(m["tokens_per_s"], ",.0f"), fmt(d["tokens_per_s"], ",.0f"))
    table.add_row("load CV / dead experts", f"{fmt(m['routing'].get('load_cv'), '.3f')} / "
                  f"{fmt(m['routing'].get('dead_experts'))}", "-")  # fmt: skip
    table.add_row("params total", fmt(m["params_total"]), fmt(d["params_total"]))
    table.add_row("params active / token", fmt(m["params_active"]), fmt(d["params_active"]))
    console.print(table)
    console.print(f"[bold]sample[/] (prompt {summary['sample']['prompt']!r}):\n{summary['sample']['text']}")
    console.print(f"report: {Path(summary['out_dir']) / 'report.md'} ({summary['elapsed_s']:.0f}s)")
