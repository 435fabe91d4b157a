"""Routing diagnostics: per-layer expert load, router entropy, dropped tokens, and router-collapse warnings.

monitor = attach(model)                      # or RoutingMonitor(num_layers, num_experts)
...; monitor.step = step; loss.backward()    # forward hooks feed MoEOutput.stats
monitor.check()                              # RouterCollapseWarning + "moekit.diagnostics" log per finding
monitor.plot_load_heatmap("load.png"); monitor.to_json("routing.json")
"""

from moekit.diagnostics.collapse import CollapseFinding, CollapseThresholds, RouterCollapseWarning
from moekit.diagnostics.hooks import attach, moe_layers
from moekit.diagnostics.monitor import LayerSummary, RoutingMonitor
from moekit.diagnostics.plots import plot_entropy, plot_load_heatmap

__all__ = [
    "CollapseFinding",
    "CollapseThresholds",
    "LayerSummary",
    "RouterCollapseWarning",
    "RoutingMonitor",
    "attach",
    "moe_layers",
    "plot_entropy",
    "plot_load_heatmap",
]
