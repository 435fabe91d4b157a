"""PNG plots of a RoutingMonitor and attach(model) forward hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit import MoELayer
from moekit.diagnostics import CollapseThresholds, RoutingMonitor, attach, moe_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 1000


def fed_monitor(history_bin=1) -> RoutingMonitor:
    mon = RoutingMonitor(["balanced", "collapsing"], [8, 4], CollapseThresholds(min_tokens=0), history_bin)
    for step in range(12):
        skew = min(step, 10)
        mon.observe(
            {
                "balanced": _stats([10] * 8, 40, 1.9),
                "collapsing": _stats([10 + 9 * skew, 10, 10 - skew, 10 - skew], 20 + 3 * skew, 1.3 - 0.12 * skew),
            },
            step=step,
        )
    return mon


def _stats(counts, tokens, entropy):
    return {
        "tokens_per_expert": torch.tensor(counts),
        "num_tokens": torch.tensor(tokens),
        "router_entropy": torch.tensor(entropy),
    }


def test_load_heatmap_over_steps_and_entropy_png(tmp_path):
    mon = fed_monitor()
    heat = mon.plot_load_heatmap(tmp_path / "load.png")
    ent = mon.plot_entropy(tmp_path / "entropy.png")
    assert is_png(heat) and is_png(ent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entropy.png", "load.png"]  # no temp files


def test_load_heatmap_without_history_is_layers_by_experts(tmp_path):
    mon = fed_monitor(history_bin=0)
    assert mon.history("balanced")["steps"] == []
    assert is_png(mon.plot_load_heatmap(tmp_path / "window.png"))
    with pytest.raises(ValueError, match="no history"):
        mon.plot_entropy(tmp_path / "entropy.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        RoutingMonitor(1, 4).plot_load_heatmap(tmp_path / "empty.png")


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"proj": nn.Linear(8, 8), "moe": MoELayer(8, 16, e, k=2)}) for e in (4, 6)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["moe"](block["proj"](x)).output
        return x


def test_attach_names_layers_by_module_path_and_feeds_from_hooks():
    torch.manual_seed(0)
    model = TwoBlocks()
    assert list(moe_layers(model)) == ["blocks.0.moe", "blocks.1.moe"]
    mon = attach(model, history_bin=1)
    assert mon.layers == ("blocks.0.moe", "blocks.1.moe")
    assert mon.num_experts == {"blocks.0.moe": 4, "blocks.1.moe": 6}
    for micro in range(4):  # two steps of two gradient-accumulation micro-batches
        mon.step = micro // 2
        model(torch.randn(3, 5, 8))
    model.eval()
    model(torch.randn(3, 5, 8))  # eval forwards are skipped by default
    s = mon.summary()
    assert s["blocks.0.moe"].num_tokens == 60 and sum(s["blocks.0.moe"].routed_per_expert) == 120  # k = 2
    assert s["blocks.1.moe"].updates == 4
    assert mon.history("blocks.1.moe")["steps"] == [0, 1]
    mon.remove_hooks()
    model.train()
    model(torch.randn(3, 5, 8))
    assert mon.summary()["blocks.0.moe"].num_tokens == 60


def test_attach_without_moe_layers_raises():
    with pytest.raises(ValueError, match="no MoELayer"):
        attach(nn.Linear(2, 2))
