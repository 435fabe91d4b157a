"""Run telemetry of the edge runtime: the layer-call trace, prefetch accuracy, throughput, a JSON summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moekit.inference.cache import CacheStats, TraceCall


@dataclass
class Telemetry:
    """What one run did, beyond the cache's own counts.

    - ``trace``: (layer, experts) of every MoE layer call in order; ``call_steps``: the model forward (step)
      each call belongs to.
    - prefetch accuracy over the layers that had a prediction: ``pred_true`` predicted experts that were used,
      ``pred_total`` predicted, ``used_total`` used.
    - ``tokens`` / ``seconds``: decoded tokens and the wall time they took.
    """

    trace: list[TraceCall] = field(default_factory=list)
    call_steps: list[int] = field(default_factory=list)
    step: int = 0
    pred_true: int = 0
    pred_total: int = 0
    used_total: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def next_step(self) -> None:
        """A model forward starts (called by the runtime's forward pre-hook)."""
        self.step += 1

    def record_call(self, layer: int, experts: tuple[int, ...]) -> None:
        self.trace.append((layer, experts))
        self.call_steps.append(self.step)

    def record_prediction(self, predicted: set[int], used: set[int]) -> None:
        self.pred_true += len(predicted & used)
        self.pred_total += len(predicted)
        self.used_total += len(used)

    def add_tokens(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    @property
    def prefetch_recall(self) -> float:
        """Share of the experts used (in layers with a prediction) that had been predicted."""
        return self.pred_true / self.used_total if self.used_total else math.nan

    @property
    def prefetch_precision(self) -> float:
        """Share of the predicted experts that were used."""
        return self.pred_true / self.pred_total if self.pred_total else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


def summarize(
    telemetry: Telemetry,
    stats: CacheStats,
    *,
    bytes_read: int,
    read_seconds: float,
    extra: dict | None = None,
) -> dict[str, Any]:
    """A JSON-able summary of one run (NaN becomes None)."""
    out: dict[str, Any] = dict(extra or {})
    out.update(
        {
            "tokens": telemetry.tokens,
            "seconds": telemetry.seconds,
            "tokens_per_s": telemetry.tokens_per_s,
            "hit_rate": stats.hit_rate,
            "hit_rate_per_layer": list(stats.layer_hit_rates().values()),
            "accesses": stats.accesses,
            "hits": stats.hits,
            "inflight_hits": stats.inflight_hits,
            "loads": stats.loads,
            "evictions": stats.evictions,
            "bytes_read": bytes_read,
            "read_seconds": read_seconds,
            "load_seconds": stats.load_seconds,
            "stall_seconds": stats.stall_seconds,
            "peak_resident_expert_bytes": stats.peak_bytes,
            "prefetch_recall": telemetry.prefetch_recall,
            "prefetch_precision": telemetry.prefetch_precision,
            "prefetch_issued": stats.prefetch_issued,
            "prefetch_used": stats.prefetch_used,
            "prefetch_wasted": stats.prefetch_wasted,
        }
    )
    return {k: _clean(v) for k, v in out.items()}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v
