"""PNG plots of the edge runtime (matplotlib Agg canvas, no pyplot state): hit rate vs budget per policy, and
the temporal locality of expert use."""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from moekit.atomic_io import atomic_write_bytes
from moekit.inference.cache import TraceCall


def _figure(ncols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


def plot_hit_rate_vs_budget(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str = "expert cache hit rate vs memory budget",
    dpi: int = 110,
) -> Path:
    """``curves[policy] = [(budget share in (0, 1], hit rate), ...]`` -> one line per policy."""
    fig, (ax,) = _figure(1, 6.0, 4.0)
    for name, points in curves.items():
        pts = sorted(points)
        style = "--" if name == "belady" else "-"
        ax.plot([100 * b for b, _ in pts], [100 * h for _, h in pts], style, marker="o", ms=3, label=name)
    ax.set_xlabel("memory budget (% of expert bytes)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path, dpi)


def reuse_distances(trace: Sequence[TraceCall], call_steps: Sequence[int]) -> list[int]:
    """For every expert use, the steps (tokens) since the same expert's previous use (first uses skipped)."""
    last: dict[tuple[int, int], int] = {}
    out = []
    for (layer, experts), step in zip(trace, call_steps, strict=True):
        for e in experts:
            prev = last.get((layer, e))
            if prev is not None:
                out.append(step - prev)
            last[(layer, e)] = step
    return out


def plot_temporal_locality(
    trace: Sequence[TraceCall],
    call_steps: Sequence[int],
    num_experts: int,
    path: str | os.PathLike,
    layer: int = 0,
    dpi: int = 110,
) -> Path:
    """Two panels: the CDF of reuse distances (steps between uses of the same expert) against the CDF for
    uniformly random routing, and which experts of ``layer`` each step used."""
    fig, (ax_cdf, ax_map) = _figure(2, 5.5, 4.0)
    dist = np.asarray(reuse_distances(trace, call_steps), dtype=float)
    if dist.size:
        xs = np.sort(dist)
        ax_cdf.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label="measured")
        sizes = Counter(len(experts) for _, experts in trace)
        k = sizes.most_common(1)[0][0] if sizes else 1  # experts per call of a decoding step
        p = min(1.0, k / num_experts)
        grid = np.arange(1, int(xs.max()) + 1)
        # geometric reuse distance when each step picks its k experts of E uniformly at random
        ax_cdf.step(grid, 1 - (1 - p) ** grid, where="post", ls="--", label=f"random routing (k={k})")
        ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("steps since the expert's previous use")
    ax_cdf.set_ylabel("share of expert uses (CDF)")
    ax_cdf.set_title("reuse distance")
    ax_cdf.grid(alpha=0.3)
    ax_cdf.legend()

    steps = sorted({s for (lay, _), s in zip(trace, call_steps, strict=True) if lay == layer})
    index = {s: i for i, s in enumerate(steps)}
    used = np.zeros((num_experts, max(len(steps), 1)))
    for (lay, experts), s in zip(trace, call_steps, strict=True):
        if lay == layer:
            used[list(experts), index[s]] = 1
    ax_map.imshow(used, aspect="auto", interpolation="nearest", cmap="Greys", origin="lower")
    ax_map.set_xlabel("step")
    ax_map.set_ylabel("expert")
    ax_map.set_title(f"experts used per step, MoE layer {layer}")
    return _save(fig, path, dpi)
