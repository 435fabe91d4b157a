"""PNG plots of a ``RoutingMonitor``, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moekit.atomic_io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moekit.diagnostics.monitor import RoutingMonitor

SHARE_LABEL = "share of routed tokens (pairs)"


def _figure(nrows: int, ncols: int, panel_w: float, panel_h: float) -> tuple[Figure, np.ndarray]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_w * ncols + 1.2, panel_h * nrows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def _expert_ticks(ax, num_experts: int) -> None:
    from matplotlib.ticker import MaxNLocator

    if num_experts <= 16:
        ax.set_yticks(range(num_experts))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))


def plot_load_heatmap(monitor: RoutingMonitor, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Expert load shares as a PNG, written atomically.

    With history: one panel per layer, experts (rows) x steps (columns; a cell spans from its bin's first
    step to the next recorded bin). Without history: one layers x experts panel of the current window. Each
    column / row sums to 1 (shares of routed pairs). Raises ValueError when there is nothing to plot.
    """
    hist = {name: monitor.history(name) for name in monitor.layers}
    if any(h["steps"] for h in hist.values()):
        return _heatmap_over_steps(monitor, hist, path, dpi)
    return _heatmap_window(monitor, path, dpi)


def _heatmap_over_steps(monitor: RoutingMonitor, hist: dict, path: str | os.PathLike, dpi: int) -> Path:
    names = monitor.layers
    ncols = min(len(names), 3)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _figure(nrows, ncols, 4.6, 3.0)
    data = {n: np.ma.masked_invalid(np.asarray(h["load_share"], dtype=float).T) for n, h in hist.items() if h["steps"]}
    vmax = max(float(d.max()) for d in data.values() if d.count()) if any(d.count() for d in data.values()) else 1.0
    mesh = None
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_visible(False)
            continue
        name, E = names[i], monitor.num_experts[names[i]]
        h = hist[name]
        ax.set_title(f"{name} (E={E}, {sum(h['tokens'])} tokens)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        if not h["steps"]:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        steps = np.asarray(h["steps"], dtype=float)
        x_edges = np.append(steps, steps[-1] + max(monitor.history_bin, 1))  # (S + 1,)
        y_edges = np.arange(E + 1) - 0.5  # (E + 1,)
        mesh = ax.pcolormesh(x_edges, y_edges, data[name], cmap="viridis", vmin=0.0, vmax=vmax, shading="flat")
        ax.set_ylim(E - 0.5, -0.5)  # expert 0 on top
        _expert_ticks(ax, E)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes.ravel().tolist(), label=SHARE_LABEL, shrink=0.9)
    fig.suptitle("Expert load over training (each column sums to 1)")
    return _save(fig, path, dpi)


def _heatmap_window(monitor: RoutingMonitor, path: str | os.PathLike, dpi: int) -> Path:
    summary = monitor.summary()
    if not any(s.num_tokens for s in summary.values()):
        raise ValueError("nothing to plot: the monitor has no history and no tokens in its window")
    names = monitor.layers
    E_max = max(monitor.num_experts.values())
    grid = np.full((len(names), E_max), np.nan)  # (L, E_max), NaN past a layer's E or for empty layers
    for i, name in enumerate(names):
        if summary[name].num_tokens:
            grid[i, : monitor.num_experts[name]] = summary[name].load_share
    fig, axes = _figure(1, 1, max(4.0, 0.35 * E_max + 2.5), max(2.5, 0.35 * len(names) + 1.5))
    ax = axes[0, 0]
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(masked.max()), 1e-12))
    blank = len(set(monitor.num_experts.values())) > 1 or any(not s.num_tokens for s in summary.values())
    ax.set_xlabel("expert" + (" (blank: past the layer's E, or no tokens)" if blank else ""))
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(names)), [f"{n}{' (collapsed)' if summary[n].collapsed else ''}" for n in names])
    if E_max <= 32:
        ax.set_xticks(range(E_max))
    fig.colorbar(im, ax=ax, label=SHARE_LABEL)
    ax.set_title("Expert load over the current window (each row sums to 1)", fontsize=10)
    return _save(fig, path, dpi)


def plot_entropy(monitor: RoutingMonitor, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Normalised router entropy (left) and load entropy (right) per layer over steps, as a PNG (atomic).

    Dashed red lines are the enabled collapse thresholds. Raises ValueError without history.
    """
    from matplotlib import colormaps

    hist = {name: monitor.history(name) for name in monitor.layers}
    if not any(h["steps"] for h in hist.values()):
        raise ValueError("nothing to plot: the monitor has no history (history_bin=0 or no updates)")
    fig, axes = _figure(1, 2, 5.0, 3.6)
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(monitor.layers)))
    panels = (
        (
            "router_entropy_norm",
            "router entropy / log E (mean per token)",
            monitor.thresholds.min_router_entropy,
        ),
        ("load_entropy_norm", "load entropy / log E (expert shares)", monitor.thresholds.min_load_entropy),
    )
    for ax, (key, title, threshold) in zip(axes[0], panels, strict=True):
        drawn = False
        for color, name in zip(colors, monitor.layers, strict=True):
            h = hist[name]
            y = np.asarray(h[key], dtype=float)
            if h["steps"] and not np.isnan(y).all():
                marker = "o" if len(y) <= 30 else None
                ax.plot(h["steps"], y, color=color, marker=marker, markersize=3, lw=1.2, label=name)
                drawn = True
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "not available\n(no router probabilities or E = 1)",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        if threshold is not None:
            ax.axhline(threshold, color="tab:red", ls="--", lw=1.0, label=f"collapse threshold {threshold:g}")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("step")
        ax.set_ylabel("normalised entropy")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if drawn and len(monitor.layers) <= 12:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Router entropy over training (1 = uniform over experts)")
    return _save(fig, path, dpi)
