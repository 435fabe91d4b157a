"""Router-collapse criteria, the findings they produce, and how findings are reported.

A layer's routing has *collapsed* when too much of its load lands on too few experts. Over a monitoring window
(all updates since the last ``RoutingMonitor.reset()``), with ``n_e`` routed (token, expert) pairs for expert
``e`` and ``mean = sum(n) / E``, a layer is flagged when any enabled criterion trips:

- ``max_mean_load``: ``max(n) / mean > max_mean_load`` (default 4). Note ``max(n) / mean <= E / k`` for top-k
  routing, so this criterion can only trip when ``E / k > max_mean_load``; the others cover small ``E / k``.
- ``load_entropy_norm``: entropy of the load shares ``n / sum(n)`` divided by ``log E`` is below
  ``min_load_entropy`` (default 0.2; 1 = perfectly balanced, 0 = every pair to one expert).
- ``router_entropy_norm``: the token-weighted mean per-token router entropy divided by ``log E`` is below
  ``min_router_entropy`` (default None = off: a confident, sharply peaked router can be perfectly balanced, so
  low per-token entropy alone is not collapse; enable it to catch saturated logits).
- ``dead_share``: the share of *dead* experts is above ``max_dead_share`` (default 0.25). An expert is dead
  when it received no pairs, or fewer than ``dead_load_ratio * mean`` pairs (default 0.01: under 1% of its
  fair share).

Criteria are evaluated only once the window holds at least ``min_tokens`` tokens (default 1024), so a few
early batches cannot raise false alarms. Every finding is reported twice: a ``RouterCollapseWarning`` (a
``UserWarning``) and a WARNING record on the ``"moekit.diagnostics"`` logger, so filtering one never silences
it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

logger = logging.getLogger("moekit.diagnostics")


class RouterCollapseWarning(UserWarning):
    """A layer's routing has collapsed onto few experts (see ``moekit.diagnostics.collapse``)."""


def _check_optional(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"CollapseThresholds.{name} must be a number or None, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"CollapseThresholds.{name} must lie in {interval} or be None, got {value!r}")


@dataclass(frozen=True)
class CollapseThresholds:
    """When a layer counts as collapsed (module doc). ``None`` disables a criterion."""

    max_mean_load: float | None = 4.0  # flag when max(n) / mean(n) > this
    min_load_entropy: float | None = 0.2  # flag when H(load shares) / log E < this
    min_router_entropy: float | None = None  # flag when mean per-token router entropy / log E < this
    max_dead_share: float | None = 0.25  # flag when (dead experts) / E > this
    dead_load_ratio: float = 0.01  # an expert is dead when n_e == 0 or n_e < dead_load_ratio * mean(n)
    min_tokens: int = 1024  # evaluate only windows with at least this many tokens

    def __post_init__(self) -> None:
        _check_optional("max_mean_load", self.max_mean_load, 1.0, math.inf)
        _check_optional("min_load_entropy", self.min_load_entropy, 0.0, 1.0)
        _check_optional("min_router_entropy", self.min_router_entropy, 0.0, 1.0)
        _check_optional("max_dead_share", self.max_dead_share, 0.0, 1.0)
        if self.dead_load_ratio is None:
            raise TypeError("CollapseThresholds.dead_load_ratio must be a number in [0, 1], got None")
        _check_optional("dead_load_ratio", self.dead_load_ratio, 0.0, 1.0)
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise TypeError(f"CollapseThresholds.min_tokens must be an int, got {self.min_tokens!r}")
        if self.min_tokens < 0:
            raise ValueError(f"CollapseThresholds.min_tokens must be >= 0, got {self.min_tokens}")


@dataclass(frozen=True)
class CollapseFinding:
    """One tripped criterion: ``metric`` of ``layer`` was ``value``, beyond ``threshold``."""

    layer: str
    metric: str  # "max_mean_load" | "load_entropy_norm" | "router_entropy_norm" | "dead_share"
    value: float
    threshold: float
    num_tokens: int  # tokens in the window the value was measured over

    @property
    def message(self) -> str:
        op = ">" if self.metric in ("max_mean_load", "dead_share") else "<"
        return (
            f"router collapse in layer {self.layer!r}: {self.metric}={self.value:.4g} {op} "
            f"{self.threshold:.4g} (over {self.num_tokens} tokens)"
        )


def evaluate(
    layer: str,
    thresholds: CollapseThresholds,
    num_tokens: int,
    max_mean_load: float | None,
    load_entropy_norm: float | None,
    router_entropy_norm: float | None,
    dead_share: float | None,
) -> list[CollapseFinding]:
    """The criteria one layer's window metrics trip (None never trips); [] below ``min_tokens``."""
    t = thresholds
    if num_tokens < t.min_tokens or num_tokens == 0:
        return []
    checks = (  # (metric, value, threshold, trips when value > threshold?)
        ("max_mean_load", max_mean_load, t.max_mean_load, True),
        ("load_entropy_norm", load_entropy_norm, t.min_load_entropy, False),
        ("router_entropy_norm", router_entropy_norm, t.min_router_entropy, False),
        ("dead_share", dead_share, t.max_dead_share, True),
    )
    found = []
    for metric, value, limit, above in checks:
        if value is None or limit is None:
            continue
        if (value > limit) if above else (value < limit):
            found.append(CollapseFinding(layer, metric, float(value), float(limit), num_tokens))
    return found


def report(findings: list[CollapseFinding], stacklevel: int = 2) -> None:
    """Emit one ``RouterCollapseWarning`` and one WARNING log record per finding."""
    for f in findings:
        logger.warning(f.message)
        warnings.warn(RouterCollapseWarning(f.message), stacklevel=stacklevel + 1)
