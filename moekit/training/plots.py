"""PNG plots of training runs, drawn on matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moekit.atomic_io import atomic_write_bytes
from moekit.training.metrics import series

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _figure(nrows: int, ncols: int, w: float, h: float):  # noqa: ANN202
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (bias-corrected), for noisy per-step losses."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def plot_loss_curves(runs: Mapping[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str]) -> Path:
    """Train (smoothed, thin) and validation (markers) loss vs optimizer steps (left) and vs wall-clock
    seconds of training (right), one colour per run."""
    fig, axes = _figure(1, 2, 5.2, 3.8)
    for (name, rows), color in zip(runs.items(), COLORS, strict=False):
        for ax, x in zip(axes[0], ("step", "wall_time"), strict=True):
            xs, ys = series(rows, "loss", x)
            if xs:
                ax.plot(xs, ema(ys), color=color, lw=1.0, alpha=0.6, label=f"{name} train (EMA)")
            xs, ys = series(rows, "val_loss", x)
            if xs:
                ax.plot(xs, ys, color=color, lw=1.8, marker="o", ms=3, label=f"{name} val")
    for ax, label in zip(axes[0], ("optimizer step", "wall-clock seconds (incl. evaluation)"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_title("loss vs steps", fontsize=10)
    axes[0][1].set_title("loss vs wall-clock", fontsize=10)
    return _save(fig, path)


ROUTING_PANELS = (
    ("router_entropy", "router entropy / log E"),
    ("load_cv", "load CV (std / mean of per-expert load)"),
    ("dropped_share", "dropped share of (token, expert) pairs"),
    ("zero_expert_share", "share of tokens with zero experts"),
)


def plot_routing_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Router entropy, load CV, dropped and zero-expert shares vs steps (means over MoE layers; EMA line
    over the raw points)."""
    fig, axes = _figure(2, 2, 4.4, 3.0)
    for ax, (key, label) in zip(axes.flat, ROUTING_PANELS, strict=True):
        xs, ys = series(rows, key)
        if xs:
            ax.plot(xs, ys, color="tab:blue", lw=0.6, alpha=0.35)
            ax.plot(xs, ema(ys), color="tab:blue", lw=1.6)
            top = max(ys)
            ax.set_ylim(-0.02 * max(top, 1e-3), max(top * 1.1, 0.05 if "share" in key else top * 1.1 + 1e-3))
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_bars(
    names: Sequence[str],
    metrics: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike[str],
    title: str,
) -> Path:
    """One bar chart per metric (``metrics[label][i]`` belongs to ``names[i]``; None = not available)."""
    n = len(metrics)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, 4.2, 3.2)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        label, values = list(metrics.items())[i]
        ys = [math.nan if v is None else v for v in values]
        ax.bar(range(len(names)), ys, color=[COLORS[j % len(COLORS)] for j in range(len(names))])
        finite = [y for y in ys if not math.isnan(y)]
        if finite and min(finite) > 0 and (max(finite) - min(finite)) < 0.1 * max(finite):
            pad = max(max(finite) - min(finite), 0.01 * max(finite))  # close values: zoom in on them
            ax.set_ylim(min(finite) - pad, max(finite) + pad)
        elif finite and max(finite) == min(finite) == 0:
            ax.set_ylim(0, 1)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
