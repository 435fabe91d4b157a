"""RoutingMonitor: accumulate MoE routing statistics over training steps and flag router collapse.

Feed it the ``stats`` of every ``MoEOutput`` (``update`` / ``observe``, or ``attach(model)`` for forward
hooks). Per layer it keeps

- a *window*: exact sums since the last ``reset()``: routed and dropped (token, expert) pairs per expert,
  tokens, and token-weighted sums of ``zero_expert_share``, ``experts_per_token``, ``router_entropy``,
  ``load_cv`` and any scalar router-specific stat; ``summary()`` and ``check()`` read it;
- a *history*: the same sums per bin of ``history_bin`` steps (``reset()`` keeps it), for the load heatmap and
  the entropy curves over training.

"Load" counts routed pairs (``MoEOutput.stats["tokens_per_expert"]``: what the router asked for, before
capacity drops), so with top-k routing every token counts k times and the load shares of a layer sum to 1.

``update`` never synchronises with the device: stats tensors are buffered and copied to the host in batches
(on ``summary``, ``check``, ``to_dict``, plotting, or every 64 buffered updates). Don't modify them in place.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.atomic_io import atomic_write_text
from moekit.diagnostics.collapse import CollapseFinding, CollapseThresholds, evaluate, logger, report

FORMAT = "moekit.routing_monitor"
VERSION = 1
_FLUSH_EVERY = 64  # buffered updates per layer before stats are copied to the host
# Stats with dedicated handling; any other scalar stat is averaged (token-weighted) into ``extra``.
_KNOWN = {"tokens_per_expert", "dropped_per_expert", "num_tokens", "dropped_share"}
_WEIGHTED = ("zero_expert_share", "experts_per_token", "router_entropy", "load_cv")


@dataclass
class _Sums:
    """Exact sums over some updates of one layer (a window or a history bin)."""

    routed: list[int]  # (E,) routed pairs per expert
    dropped: list[int]  # (E,) pairs dropped for capacity per expert
    tokens: int = 0
    updates: int = 0
    # name -> [sum of value * num_tokens, sum of num_tokens over updates that had the stat]
    weighted: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def zeros(cls, num_experts: int) -> _Sums:
        return cls([0] * num_experts, [0] * num_experts)

    def add(self, routed: list[int], dropped: list[int], tokens: int, scalars: dict[str, float]) -> None:
        self.routed = [a + b for a, b in zip(self.routed, routed, strict=True)]
        self.dropped = [a + b for a, b in zip(self.dropped, dropped, strict=True)]
        self.tokens += tokens
        self.updates += 1
        for name, value in scalars.items():
            acc = self.weighted.setdefault(name, [0.0, 0])
            acc[0] += value * tokens
            acc[1] += tokens

    def mean(self, name: str) -> float | None:
        """Token-weighted mean of a scalar stat, or None when no update with tokens carried it."""
        acc = self.weighted.get(name)
        return acc[0] / acc[1] if acc and acc[1] else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "routed": self.routed,
            "dropped": self.dropped,
            "tokens": self.tokens,
            "updates": self.updates,
            "weighted": self.weighted,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _Sums:
        weighted = {k: [float(v[0]), int(v[1])] for k, v in d["weighted"].items()}
        return cls(list(d["routed"]), list(d["dropped"]), int(d["tokens"]), int(d["updates"]), weighted)


def load_metrics(routed: Sequence[int], dead_load_ratio: float) -> dict[str, Any]:
    """Balance metrics of one (E,) load vector: shares, CV, max/mean, entropy, dead experts."""
    E, total = len(routed), sum(routed)
    if total == 0:
        return {
            "load_share": (0.0,) * E,
            "load_cv": None,
            "max_mean_load": None,
            "load_entropy": None,
            "load_entropy_norm": None,
            "dead_experts": (),
            "dead_share": None,
        }
    mean = total / E
    share = tuple(n / total for n in routed)
    cv = math.sqrt(sum((n - mean) ** 2 for n in routed) / E) / mean  # population std / mean
    entropy = 0.0 - sum(p * math.log(p) for p in share if p > 0)  # 0.0 - : no -0.0
    dead = tuple(e for e, n in enumerate(routed) if n == 0 or n < dead_load_ratio * mean)
    return {
        "load_share": share,
        "load_cv": cv,
        "max_mean_load": max(routed) / mean,
        "load_entropy": entropy,
        "load_entropy_norm": entropy / math.log(E) if E > 1 else None,
        "dead_experts": dead,
        "dead_share": len(dead) / E,
    }


@dataclass(frozen=True)
class LayerSummary:
    """Routing of one layer over the current window. Entropies in nats; ``*_norm`` divided by log E.

    Metrics are None when undefined (no tokens in the window; entropies need E > 1; router entropy needs a
    router with probabilities). ``evaluated``: the window reached ``thresholds.min_tokens``; ``collapsed``:
    some criterion tripped (``reasons`` names them; see ``moekit.diagnostics.collapse``).
    """

    layer: str
    num_experts: int
    updates: int
    num_tokens: int
    routed_per_expert: tuple[int, ...]  # (E,) routed pairs
    dropped_per_expert: tuple[int, ...]  # (E,) pairs dropped for capacity
    load_share: tuple[float, ...]  # (E,) routed pairs / all routed pairs
    load_cv: float | None  # std / mean of routed_per_expert over the window
    batch_load_cv: float | None  # token-weighted mean of the per-batch stats["load_cv"]
    max_mean_load: float | None
    load_entropy: float | None
    load_entropy_norm: float | None
    router_entropy: float | None  # token-weighted mean per-token entropy of the router probabilities
    router_entropy_norm: float | None
    dropped_share: float | None  # dropped pairs / routed pairs
    zero_expert_share: float | None  # share of tokens that no expert processed
    experts_per_token: float | None  # kept experts per token
    dead_experts: tuple[int, ...]
    dead_share: float | None
    evaluated: bool
    collapsed: bool
    reasons: tuple[str, ...]
    extra: dict[str, float]  # token-weighted means of router-specific scalar stats

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class RoutingMonitor:
    """Accumulates ``MoEOutput.stats`` per layer and reports balance metrics and router collapse.

    Args:
        layers: the number of MoE layers (named ``"layer_0"``, ...) or their names (e.g. module paths).
        num_experts: E, one int for every layer or one per layer.
        thresholds: collapse criteria (``CollapseThresholds``).
        history_bin: steps summed into one history snapshot (1 = every step); 0 keeps no history.
    """

    def __init__(
        self,
        layers: int | Sequence[str],
        num_experts: int | Sequence[int],
        thresholds: CollapseThresholds | None = None,
        history_bin: int = 1,
    ) -> None:
        if isinstance(layers, bool):
            raise TypeError("layers must be an int or a sequence of names, got a bool")
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"layers must be >= 1, got {layers}")
            names = [f"layer_{i}" for i in range(layers)]
        elif isinstance(layers, str) or not isinstance(layers, Sequence):
            raise TypeError(f"layers must be an int or a sequence of names, got {type(layers).__name__}")
        else:
            names = list(layers)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError("layers must be a non-empty sequence of non-empty strings")
            if len(set(names)) != len(names):
                raise ValueError(f"layers must be unique, got {names}")
        experts = [num_experts] * len(names) if isinstance(num_experts, int) else list(num_experts)
        if len(experts) != len(names):
            raise ValueError(f"num_experts has {len(experts)} entries but there are {len(names)} layers")
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or e < 1:
                raise ValueError(f"num_experts must be ints >= 1, got {e!r}")
        thresholds = CollapseThresholds() if thresholds is None else thresholds
        if not isinstance(thresholds, CollapseThresholds):
            raise TypeError(f"thresholds must be a CollapseThresholds, got {type(thresholds).__name__}")
        if isinstance(history_bin, bool) or not isinstance(history_bin, int) or history_bin < 0:
            raise ValueError(f"history_bin must be an int >= 0, got {history_bin!r}")
        self.layers: tuple[str, ...] = tuple(names)
        self.num_experts: dict[str, int] = dict(zip(names, experts, strict=True))
        self.thresholds = thresholds
        self.history_bin = history_bin
        self.step: int | None = None  # step used by forward hooks (``attach``); None = next step per layer
        self.hook_handles: list = []  # forward-hook handles installed by ``attach``
        self._window = {n: _Sums.zeros(self.num_experts[n]) for n in names}
        self._history: dict[str, dict[int, _Sums]] = {n: {} for n in names}
        self._last_step: dict[str, int | None] = {n: None for n in names}
        self._pending: dict[str, list[tuple[int, dict[str, Tensor]]]] = {n: [] for n in names}

    # ------------------------------------------------------------------ feeding
    def update(self, layer: int | str, stats: Mapping[str, Any], step: int | None = None) -> None:
        """Add one forward pass of ``layer`` (index or name). ``step`` None = the layer's last step + 1.

        Several updates with the same step (gradient accumulation) sum into the same history snapshot.
        """
        name = self._name(layer)
        if step is None:
            last = self._last_step[name]
            step = 0 if last is None else last + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
        if not isinstance(stats, Mapping):
            raise TypeError(f"stats must be a mapping (MoEOutput.stats), got {type(stats).__name__}")
        for key in ("tokens_per_expert", "num_tokens"):
            if key not in stats:
                raise KeyError(f"stats of layer {name!r} lack {key!r} (expected MoEOutput.stats)")
        E = self.num_experts[name]
        kept: dict[str, Tensor] = {}
        for key, value in stats.items():
            t = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
            if key in ("tokens_per_expert", "dropped_per_expert"):
                if t.shape != (E,):
                    raise ValueError(
                        f"stats[{key!r}] of layer {name!r} must have shape ({E},), got {tuple(t.shape)}; "
                        "make a new monitor when the number of experts changes"
                    )
            elif t.numel() != 1:
                continue  # non-scalar router-specific entries are not tracked
            kept[key] = t
        self._last_step[name] = step if self._last_step[name] is None else max(self._last_step[name], step)
        self._pending[name].append((step, kept))
        if len(self._pending[name]) >= _FLUSH_EVERY:
            self._flush(name)

    def observe(self, outputs: Sequence[Any] | Mapping[str, Any], step: int | None = None) -> None:
        """Add one forward pass of every layer.

        ``outputs``: ``MoEOutput``s (or stats dicts) in layer order, or a mapping layer name -> output.
        ``step`` None = one more than the latest step of any layer.
        """
        if isinstance(outputs, Mapping):
            items = list(outputs.items())
        else:
            items = list(enumerate(outputs))
            if len(items) != len(self.layers):
                raise ValueError(f"observe got {len(items)} outputs for {len(self.layers)} layers")
        if step is None:
            seen = [s for s in self._last_step.values() if s is not None]
            step = max(seen) + 1 if seen else 0
        for layer, out in items:
            self.update(layer, out if isinstance(out, Mapping) else out.stats, step=step)

    def reset(self, history: bool = False) -> None:
        """Start a new window (history is kept unless ``history=True``)."""
        self._flush_all()
        self._window = {n: _Sums.zeros(self.num_experts[n]) for n in self.layers}
        if history:
            self._history = {n: {} for n in self.layers}
            self._last_step = {n: None for n in self.layers}

    def remove_hooks(self) -> None:
        """Remove the forward hooks ``attach`` installed."""
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles = []

    # ------------------------------------------------------------------ reading
    def summary(self) -> dict[str, LayerSummary]:
        """Layer name -> ``LayerSummary`` of the current window."""
        self._flush_all()
        return {name: self._summarize(name, self._window[name]) for name in self.layers}

    def check(self) -> list[CollapseFinding]:
        """Evaluate the collapse criteria; warn (``RouterCollapseWarning``) and log each finding."""
        findings: list[CollapseFinding] = []
        for s in self.summary().values():
            if not s.evaluated:
                logger.debug(
                    "layer %r not evaluated: %d tokens < min_tokens=%d",
                    s.layer,
                    s.num_tokens,
                    self.thresholds.min_tokens,
                )
            findings.extend(self._findings(s.layer, s))
        report(findings, stacklevel=2)
        return findings

    def history(self, layer: int | str) -> dict[str, Any]:
        """One layer's history bins as lists, in step order.

        ``steps`` (S,) first step of each bin; ``tokens`` (S,); ``load_share`` (S, E) (NaN rows for bins
        without pairs); ``router_entropy_norm`` and ``load_entropy_norm`` (S,) (NaN where undefined).
        """
        name = self._name(layer)
        E = self.num_experts[name]
        out: dict[str, list] = {
            "steps": [],
            "load_share": [],
            "router_entropy_norm": [],
            "load_entropy_norm": [],
            "tokens": [],
        }
        self._flush_all()
        for step, sums in sorted(self._history[name].items()):
            m = load_metrics(sums.routed, self.thresholds.dead_load_ratio)
            ent = sums.mean("router_entropy")
            out["steps"].append(step)
            out["load_share"].append(list(m["load_share"]) if sum(sums.routed) else [math.nan] * E)
            out["router_entropy_norm"].append(_nan(_norm(ent, E)))
            out["load_entropy_norm"].append(_nan(m["load_entropy_norm"]))
            out["tokens"].append(sums.tokens)
        return out

    # ------------------------------------------------------------------ persistence and plots
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state (settings, window, history) plus a ``summary`` for readers (ignored on load)."""
        self._flush_all()
        return {
            "format": FORMAT,
            "version": VERSION,
            "layers": list(self.layers),
            "num_experts": [self.num_experts[n] for n in self.layers],
            "thresholds": asdict(self.thresholds),
            "history_bin": self.history_bin,
            "last_step": [self._last_step[n] for n in self.layers],
            "window": {n: self._window[n].to_dict() for n in self.layers},
            "history": {
                n: [{"step": s, **self._history[n][s].to_dict()} for s in sorted(self._history[n])] for n in self.layers
            },
            "summary": {n: s.to_dict() for n, s in self.summary().items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingMonitor:
        """Rebuild a monitor from ``to_dict()`` output."""
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(
                f"not a {FORMAT} v{VERSION} document: format={d.get('format')!r} version={d.get('version')!r}"
            )
        mon = cls(d["layers"], d["num_experts"], CollapseThresholds(**d["thresholds"]), d["history_bin"])
        for name, last in zip(mon.layers, d["last_step"], strict=True):
            mon._last_step[name] = last
            mon._window[name] = _Sums.from_dict(d["window"][name])
            mon._history[name] = {int(h["step"]): _Sums.from_dict(h) for h in d["history"][name]}
            for sums in [mon._window[name], *mon._history[name].values()]:
                if len(sums.routed) != mon.num_experts[name] or len(sums.dropped) != mon.num_experts[name]:
                    raise ValueError(f"layer {name!r}: per-expert lists must have {mon.num_experts[name]} entries")
        return mon

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as JSON, atomically. Returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RoutingMonitor:
        """Read a monitor written by ``to_json``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def plot_load_heatmap(self, path: str | os.PathLike) -> Path:
        """PNG of expert load shares; see ``moekit.diagnostics.plots.plot_load_heatmap``."""
        from moekit.diagnostics.plots import plot_load_heatmap

        return plot_load_heatmap(self, path)

    def plot_entropy(self, path: str | os.PathLike) -> Path:
        """PNG of normalised router and load entropy over steps; see ``moekit.diagnostics.plots``."""
        from moekit.diagnostics.plots import plot_entropy

        return plot_entropy(self, path)

    # ------------------------------------------------------------------ internals
    def _name(self, layer: int | str) -> str:
        if isinstance(layer, str):
            if layer not in self.num_experts:
                raise KeyError(f"unknown layer {layer!r}; known: {list(self.layers)}")
            return layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not -len(self.layers) <= layer < len(self.layers):
            raise KeyError(f"layer must be a name or an index in [0, {len(self.layers)}), got {layer!r}")
        return self.layers[layer]

    def _flush_all(self) -> None:
        for name in self.layers:
            self._flush(name)

    def _flush(self, name: str) -> None:
        """Copy the buffered stats of one layer to the host and add them to the window and history."""
        pending, self._pending[name] = self._pending[name], []
        E = self.num_experts[name]
        for step, stats in pending:
            routed = [int(v) for v in stats["tokens_per_expert"].tolist()]
            dropped = (
                [int(v) for v in stats["dropped_per_expert"].tolist()] if "dropped_per_expert" in stats else [0] * E
            )
            tokens = int(stats["num_tokens"].item())
            if tokens < 0 or min(routed) < 0 or min(dropped) < 0:
                raise ValueError(f"negative counts in the stats of layer {name!r} at step {step}")
            scalars = {k: float(v.item()) for k, v in stats.items() if k not in _KNOWN}
            self._window[name].add(routed, dropped, tokens, scalars)
            if self.history_bin:
                key = step // self.history_bin * self.history_bin
                self._history[name].setdefault(key, _Sums.zeros(E)).add(routed, dropped, tokens, scalars)

    def _findings(self, name: str, s: LayerSummary) -> list[CollapseFinding]:
        return evaluate(
            name,
            self.thresholds,
            s.num_tokens,
            s.max_mean_load,
            s.load_entropy_norm,
            s.router_entropy_norm,
            s.dead_share,
        )

    def _summarize(self, name: str, w: _Sums) -> LayerSummary:
        E = self.num_experts[name]
        m = load_metrics(w.routed, self.thresholds.dead_load_ratio)
        total = sum(w.routed)
        ent = w.mean("router_entropy")
        found = evaluate(
            name,
            self.thresholds,
            w.tokens,
            m["max_mean_load"],
            m["load_entropy_norm"],
            _norm(ent, E),
            m["dead_share"],
        )
        extra = {k: w.mean(k) for k in sorted(w.weighted) if k not in _WEIGHTED}
        return LayerSummary(
            layer=name,
            num_experts=E,
            updates=w.updates,
            num_tokens=w.tokens,
            routed_per_expert=tuple(w.routed),
            dropped_per_expert=tuple(w.dropped),
            load_share=m["load_share"],
            load_cv=m["load_cv"],
            batch_load_cv=w.mean("load_cv"),
            max_mean_load=m["max_mean_load"],
            load_entropy=m["load_entropy"],
            load_entropy_norm=m["load_entropy_norm"],
            router_entropy=ent,
            router_entropy_norm=_norm(ent, E),
            dropped_share=sum(w.dropped) / total if total else None,
            zero_expert_share=w.mean("zero_expert_share"),
            experts_per_token=w.mean("experts_per_token"),
            dead_experts=m["dead_experts"],
            dead_share=m["dead_share"],
            evaluated=w.tokens > 0 and w.tokens >= self.thresholds.min_tokens,
            collapsed=bool(found),
            reasons=tuple(f.metric for f in found),
            extra={k: v for k, v in extra.items() if v is not None},
        )


def _norm(entropy: float | None, num_experts: int) -> float | None:
    return entropy / math.log(num_experts) if entropy is not None and num_experts > 1 else None


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
