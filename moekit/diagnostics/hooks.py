"""Find the MoE layers of a model and (optionally) feed a ``RoutingMonitor`` from forward hooks."""

from __future__ import annotations

from typing import Any

from torch import nn

from moekit.diagnostics.collapse import CollapseThresholds
from moekit.diagnostics.monitor import RoutingMonitor
from moekit.layer import MoELayer
from moekit.output import MoEOutput


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """Module path -> MoELayer for every MoELayer in ``model`` (``"<root>"`` when model itself is one)."""
    return {name or "<root>": m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def attach(
    model: nn.Module,
    thresholds: CollapseThresholds | None = None,
    history_bin: int = 1,
    hooks: bool = True,
    training_only: bool = True,
) -> RoutingMonitor:
    """A ``RoutingMonitor`` with one layer per MoELayer of ``model``, named by module path.

    With ``hooks``, a forward hook on each layer calls
    ``monitor.update(name, output.stats, step=monitor.step)``: set ``monitor.step`` to the global step so that
    gradient-accumulation micro-batches share a step (None = each forward is a new step). ``training_only``
    skips forwards in eval mode. ``monitor.remove_hooks()`` detaches the hooks.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no MoELayer")
    monitor = RoutingMonitor(
        list(layers), [m.num_experts for m in layers.values()], thresholds=thresholds, history_bin=history_bin
    )
    if hooks:
        for name, layer in layers.items():
            monitor.hook_handles.append(layer.register_forward_hook(_hook(monitor, name, training_only)))
    return monitor


def _hook(monitor: RoutingMonitor, name: str, training_only: bool):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if training_only and not module.training:
            return
        if isinstance(output, MoEOutput):
            monitor.update(name, output.stats, step=monitor.step)

    return hook
