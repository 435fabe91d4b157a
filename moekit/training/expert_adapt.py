"""DynMoE expert add/remove between optimizer steps, and what the trainer needs around it: carrying AdamW
state over to the resized parameters, the routers' observation records in checkpoints, and resizing the
routing monitor.

Every ``TrainConfig.dynmoe_adapt_every`` steps, each MoE layer whose router can grow and shrink (DynMoE's
``TopAnyRouter``):

1. removes the experts no token activated over the router's ``removal_window`` (``unused_experts()``),
   highest index first, keeping at least ``TrainConfig.dynmoe_min_experts``;
2. adds one expert when some token activated none since the last check (``needs_new_expert()``, which
   respects the router's ``max_experts``); its gate vector is the normalised sum of those tokens;
3. starts a new observation window when it changed or its window was complete.

Parameters of changed layers are replaced, so the optimizer is rebuilt; surviving experts keep their AdamW
moments (rows sliced out of the old ``exp_avg`` / ``exp_avg_sq``), new experts start from zero moments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

RECORDS_FILE = "router_records.safetensors"
_RECORD_BUFFERS = ("activation_counts", "unrouted_sum", "unrouted_count")


@dataclass
class ExpertChange:
    """What one adaptation did to one layer (indices as they were before the change)."""

    layer: str
    removed: list[int]
    added: list[int]  # indices of the new experts after the change
    num_experts: int  # E after the change
    source: list[int | None]  # new expert i came from old expert source[i] (None: new)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d


def adaptive_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, MoELayer) of the model's MoE layers whose router can add and remove experts."""
    fn = getattr(model, "moe_layers", None)
    layers = list(fn()) if callable(fn) else []
    needed = ("needs_new_expert", "unused_experts", "add_expert", "remove_expert", "reset_records")
    return [(n, m) for n, m in layers if all(callable(getattr(m.router, a, None)) for a in needed)]


@torch.no_grad()
def adapt_experts(model: nn.Module, min_experts: int = 1) -> list[ExpertChange]:
    """Remove unused experts and add one where tokens found none, in every adaptive layer (see module doc).

    ``model`` must have ``add_expert(layer)`` / ``remove_expert(layer, e)`` (``MoETransformerLM``). Returns the
    changes (empty when nothing changed); the optimizer must be rebuilt when it is not empty."""
    changes = []
    for name, layer in adaptive_layers(model):
        router = layer.router
        source: list[int | None] = list(range(layer.num_experts))
        removed = []
        for e in sorted(router.unused_experts(), reverse=True):  # descending: lower indices stay valid
            if layer.num_experts <= min_experts:
                break
            model.remove_expert(name, e)
            source.pop(e)
            removed.append(e)
        added = []
        if router.needs_new_expert():
            added.append(model.add_expert(name))
            source.append(None)
        if removed or added or router.steps_recorded >= router.removal_window:
            router.reset_records()
        if removed or added:
            changes.append(ExpertChange(name, sorted(removed), added, layer.num_experts, source))
    return changes


# ---------------------------------------------------------------------------------------------- optimizer
def transfer_optimizer_state(
    old: torch.optim.Optimizer,
    new: torch.optim.Optimizer,
    old_params: dict[str, Tensor],
    model: nn.Module,
    changes: list[ExpertChange],
) -> None:
    """Copy ``old``'s per-parameter state into ``new`` (built over ``model`` after the change).

    ``old_params``: the model's ``named_parameters()`` before the change. Unchanged parameters keep their
    state as is; a resized parameter of a changed layer (leading dim E) gets the rows of its surviving
    experts and zeros for new ones; ``step`` counters are copied. Group hyper-parameters (the current lr)
    are copied too."""
    by_prefix = {f"{c.layer}.": c.source for c in changes}
    for g_new, g_old in zip(new.param_groups, old.param_groups, strict=True):
        for key, value in g_old.items():
            if key != "params":
                g_new[key] = value
    for name, p in model.named_parameters():
        q = old_params.get(name)
        if q is None or q not in old.state:
            continue
        state = old.state[q]
        if q is p:
            new.state[p] = state
            continue
        source = next((s for prefix, s in by_prefix.items() if name.startswith(prefix)), None)
        if source is None or q.shape[1:] != p.shape[1:] or p.shape[0] != len(source):
            shapes = f"{tuple(q.shape)} to {tuple(p.shape)}"
            raise RuntimeError(f"cannot carry the optimizer state of {name!r} from {shapes}")
        new.state[p] = {k: _rows(v, q.shape, source) for k, v in state.items()}


def _rows(value: Any, old_shape: torch.Size, source: list[int | None]) -> Any:
    """Rows ``source`` of a per-parameter state tensor shaped like the parameter (zeros for None)."""
    if not isinstance(value, Tensor) or value.shape != old_shape:
        return value.clone() if isinstance(value, Tensor) else value  # e.g. the step counter
    out = value.new_zeros((len(source), *old_shape[1:]))
    keep = [i for i, s in enumerate(source) if s is not None]
    if keep:
        out[keep] = value[[source[i] for i in keep]]
    return out


# ---------------------------------------------------------------------------------------------- records
def router_records(model: nn.Module) -> dict[str, Tensor]:
    """The adaptive routers' observation records as tensors (for a checkpoint): they decide the next
    adaptation, so an exact resume needs them."""
    out: dict[str, Tensor] = {}
    for name, layer in adaptive_layers(model):
        router = layer.router
        for buf in _RECORD_BUFFERS:
            out[f"{name}.{buf}"] = getattr(router, buf).detach().to("cpu", copy=True).contiguous()
        out[f"{name}.steps_recorded"] = torch.tensor(router.steps_recorded, dtype=torch.long)
    return out


def load_router_records(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Inverse of `router_records`; ``where`` names the file in errors."""
    for name, layer in adaptive_layers(model):
        router = layer.router
        for buf in (*_RECORD_BUFFERS, "steps_recorded"):
            key = f"{name}.{buf}"
            if key not in tensors:
                raise ValueError(f"{where}: router records lack {key!r}")
            value = tensors[key]
            if buf == "steps_recorded":
                router.steps_recorded = int(value)
                continue
            current = getattr(router, buf)
            if value.shape != current.shape:
                raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the model {tuple(current.shape)}")
            current.copy_(value)


# ---------------------------------------------------------------------------------------------- monitor
def resize_monitor(monitor: Any, changes: list[ExpertChange]) -> Any:
    """A ``RoutingMonitor`` like ``monitor`` whose per-expert window and history follow ``changes`` (rows of
    removed experts dropped, zeros for new ones); the history shows the experts that exist now."""
    from moekit.diagnostics import RoutingMonitor

    d = monitor.to_dict()
    d.pop("summary", None)
    for c in changes:
        if c.layer not in d["layers"]:
            continue
        i = d["layers"].index(c.layer)
        d["num_experts"][i] = c.num_experts
        sums = [d["window"][c.layer], *d["history"][c.layer]]
        for s in sums:
            for key in ("routed", "dropped"):
                s[key] = [s[key][j] if j is not None else 0 for j in c.source]
    return RoutingMonitor.from_dict(d)
