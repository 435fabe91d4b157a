"""RoutingMonitor: exact accumulation, metrics vs hand computation, collapse warnings, JSON round trip."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

from moekit import MoELayer
from moekit.diagnostics import CollapseThresholds, RouterCollapseWarning, RoutingMonitor
from moekit.losses import cv_squared


def stats(counts, tokens, entropy=None, dropped=None, zero=0.0, ept=1.0, **extra):
    """A synthetic MoEOutput.stats dict."""
    s = {
        "tokens_per_expert": torch.tensor(counts),
        "dropped_per_expert": torch.tensor(dropped if dropped is not None else [0] * len(counts)),
        "num_tokens": torch.tensor(tokens),
        "dropped_share": torch.tensor(0.0),
        "zero_expert_share": torch.tensor(zero),
        "experts_per_token": torch.tensor(ept),
        "load_cv": cv_squared(torch.tensor(counts)).sqrt(),
    }
    if entropy is not None:
        s["router_entropy"] = torch.tensor(entropy, dtype=torch.float64)
    s.update({k: torch.tensor(v) for k, v in extra.items()})
    return s


def test_counts_accumulate_exactly_over_updates():
    g = torch.Generator().manual_seed(0)
    mon = RoutingMonitor(2, 5, history_bin=2)
    totals = [torch.zeros(5, dtype=torch.long) for _ in range(2)]
    dropped_totals = [torch.zeros(5, dtype=torch.long) for _ in range(2)]
    tokens = [0, 0]
    for step in range(7):
        for layer in range(2):
            c = torch.randint(0, 1000, (5,), generator=g)
            d = torch.minimum(torch.randint(0, 50, (5,), generator=g), c)
            t = int(c.sum()) // 2
            mon.update(layer, stats(c.tolist(), t, dropped=d.tolist()), step=step)
            totals[layer] += c
            dropped_totals[layer] += d
            tokens[layer] += t
    summary = mon.summary()
    for layer, name in enumerate(mon.layers):
        s = summary[name]
        assert s.routed_per_expert == tuple(totals[layer].tolist())
        assert s.dropped_per_expert == tuple(dropped_totals[layer].tolist())
        assert s.num_tokens == tokens[layer] and s.updates == 7
        assert s.dropped_share == pytest.approx(dropped_totals[layer].sum().item() / totals[layer].sum().item())
        h = mon.history(name)
        assert h["steps"] == [0, 2, 4, 6]  # bins of two steps
        assert sum(h["tokens"]) == tokens[layer]


def test_many_updates_flush_in_batches_and_steps_auto_increment():
    mon = RoutingMonitor(["x"], 2)
    for _ in range(150):  # more than the 64-update host-copy batch
        mon.update("x", stats([3, 1], 2))
    s = mon.summary()["x"]
    assert s.routed_per_expert == (450, 150) and s.num_tokens == 300 and s.updates == 150
    assert mon.history("x")["steps"] == list(range(150))


def test_update_never_reads_tensor_values():
    # Meta tensors have shapes but no data: any host read (.item(), .tolist()) in update() would raise, so
    # this shows update() does not synchronise with an accelerator. Values are read later, in summary().
    meta = {k: v.to("meta") for k, v in stats([1, 2, 3, 4], 5, entropy=0.5).items()}
    mon = RoutingMonitor(1, 4)
    for _ in range(10):
        mon.update(0, meta)
    with pytest.raises((NotImplementedError, RuntimeError)):
        mon.summary()


def test_metrics_match_hand_computation():
    th = CollapseThresholds(min_tokens=0)
    mon = RoutingMonitor(1, 4, th)
    mon.update(0, stats([4, 1, 0, 0], 5, entropy=1.0, zero=0.2, ept=0.8, balance_bias_norm=2.0, dropped=[1, 0, 0, 0]))
    mon.update(0, stats([2, 1, 0, 0], 3, entropy=0.2, zero=0.0, ept=1.0, balance_bias_norm=4.0))
    s = mon.summary()["layer_0"]
    counts = [6, 2, 0, 0]  # mean 2, population var (16 + 0 + 4 + 4) / 4 = 6
    assert s.routed_per_expert == tuple(counts)
    assert s.load_share == (0.75, 0.25, 0.0, 0.0)
    assert s.load_cv == pytest.approx(math.sqrt(6) / 2)
    assert s.load_cv == pytest.approx(cv_squared(torch.tensor(counts)).sqrt().item())
    assert s.max_mean_load == pytest.approx(3.0)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s.load_entropy == pytest.approx(h)
    assert s.load_entropy_norm == pytest.approx(h / math.log(4))
    assert s.router_entropy == pytest.approx((1.0 * 5 + 0.2 * 3) / 8)  # token-weighted
    assert s.router_entropy_norm == pytest.approx((5.6 / 8) / math.log(4))
    assert s.zero_expert_share == pytest.approx(1.0 / 8)
    assert s.experts_per_token == pytest.approx((0.8 * 5 + 3) / 8)
    assert s.dropped_share == pytest.approx(1 / 8)
    assert s.dead_experts == (2, 3) and s.dead_share == 0.5
    assert s.extra == {"balance_bias_norm": pytest.approx((2.0 * 5 + 4.0 * 3) / 8)}
    assert s.batch_load_cv is not None


def test_dead_experts_below_documented_share():
    # mean = 1000; expert 3 has 9 < 0.01 * 1000 -> dead; expert 2 has 10, not below -> alive.
    counts = [1991, 1990, 10, 9]
    mon = RoutingMonitor(1, 4, CollapseThresholds(min_tokens=0))
    mon.update(0, stats(counts, 4000))
    assert mon.summary()["layer_0"].dead_experts == (3,)
    strict = RoutingMonitor(1, 4, CollapseThresholds(min_tokens=0, dead_load_ratio=0.0))
    strict.update(0, stats(counts, 4000))
    assert strict.summary()["layer_0"].dead_experts == ()


def collapsed_layer_outputs(steps=3):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 8, k=1, router_options={"bias": True})
    with torch.no_grad():
        layer.router.bias[5] = 100.0  # every token to expert 5
    return [layer(torch.randn(4, 128, 8)) for _ in range(steps)]


def test_collapsed_router_warns_and_logs(caplog):
    mon = RoutingMonitor(1, 8)
    for out in collapsed_layer_outputs():
        mon.observe([out])
    s = mon.summary()["layer_0"]
    assert s.routed_per_expert == (0, 0, 0, 0, 0, 1536, 0, 0)
    assert s.collapsed and s.evaluated
    assert set(s.reasons) == {"max_mean_load", "load_entropy_norm", "dead_share"}
    with caplog.at_level(logging.WARNING, logger="moekit.diagnostics"):
        with pytest.warns(RouterCollapseWarning) as caught:
            findings = mon.check()
    assert {f.metric for f in findings} == {"max_mean_load", "load_entropy_norm", "dead_share"}
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and all("layer 'layer_0'" in m for m in messages)
    assert any("max_mean_load=8 > 4" in m for m in messages)
    records = [r for r in caplog.records if r.name == "moekit.diagnostics" and r.levelno == logging.WARNING]
    assert len(records) == 3
    assert all("layer 'layer_0'" in r.getMessage() for r in records)
    assert any("dead_share=0.875" in r.getMessage() for r in records)


def test_router_entropy_criterion_is_opt_in():
    th = CollapseThresholds(min_tokens=0, min_router_entropy=0.2)
    mon = RoutingMonitor(1, 8, th)
    mon.update(0, stats([100] * 8, 800, entropy=0.1))  # balanced load, very confident router
    assert mon.summary()["layer_0"].reasons == ("router_entropy_norm",)
    with pytest.warns(RouterCollapseWarning, match="router_entropy_norm"):
        mon.check()
    default = RoutingMonitor(1, 8, CollapseThresholds(min_tokens=0))
    default.update(0, stats([100] * 8, 800, entropy=0.1))
    assert not default.summary()["layer_0"].collapsed


def test_balanced_router_is_silent(caplog):
    mon = RoutingMonitor(3, 8)
    for step in range(4):
        mon.observe([stats([130, 120, 128, 125, 131, 127, 126, 137], 512, entropy=2.0)] * 3, step=step)
    with caplog.at_level(logging.DEBUG, logger="moekit.diagnostics"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert mon.check() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any(s.collapsed for s in mon.summary().values())


def test_no_evaluation_below_min_tokens():
    mon = RoutingMonitor(1, 8, CollapseThresholds(min_tokens=1000))
    mon.update(0, stats([999, 0, 0, 0, 0, 0, 0, 0], 999))
    s = mon.summary()["layer_0"]
    assert not s.evaluated and not s.collapsed
    assert mon.check() == []
    mon.update(0, stats([1, 0, 0, 0, 0, 0, 0, 0], 1))
    with pytest.warns(RouterCollapseWarning):
        assert mon.check()


def test_reset_clears_window_keeps_history():
    mon = RoutingMonitor(1, 2)
    mon.update(0, stats([1, 1], 2), step=0)
    mon.reset()
    mon.update(0, stats([2, 0], 2), step=1)
    assert mon.summary()["layer_0"].routed_per_expert == (2, 0)
    assert mon.history(0)["steps"] == [0, 1]
    mon.reset(history=True)
    assert mon.history(0)["steps"] == [] and mon.summary()["layer_0"].num_tokens == 0


def test_empty_layer_summary_is_undefined_not_zero():
    s = RoutingMonitor(1, 4).summary()["layer_0"]
    assert s.num_tokens == 0 and s.load_cv is None and s.max_mean_load is None and s.dead_experts == ()
    assert not s.evaluated and not s.collapsed


def test_json_round_trip(tmp_path):
    mon = RoutingMonitor(["blocks.0.moe", "blocks.1.moe"], [4, 2], CollapseThresholds(min_tokens=3), 3)
    for step in range(5):
        mon.update("blocks.0.moe", stats([step, 1, 2, 0], 3, entropy=0.3 * step, dev_bias=0.1), step=step)
        mon.update(1, stats([2, 1], 3), step=step)
    path = mon.to_json(tmp_path / "sub" / "routing.json")
    assert [p.name for p in path.parent.iterdir()] == ["routing.json"]  # no temp file left behind
    back = RoutingMonitor.from_json(path)
    assert back.to_dict() == mon.to_dict()
    assert back.summary() == mon.summary()
    assert back.thresholds == mon.thresholds and back.history_bin == 3
    back.update(1, stats([1, 1], 2))  # continues counting after the last stored step
    assert back.history(1)["steps"] == [0, 3]


def test_from_dict_rejects_other_documents():
    with pytest.raises(ValueError, match="moekit.routing_monitor"):
        RoutingMonitor.from_dict({"format": "something else"})


def test_input_validation_names_the_problem():
    with pytest.raises(ValueError, match="max_mean_load"):
        CollapseThresholds(max_mean_load=0.5)
    with pytest.raises(ValueError, match="min_load_entropy"):
        CollapseThresholds(min_load_entropy=1.5)
    with pytest.raises(TypeError, match="min_tokens"):
        CollapseThresholds(min_tokens=1.5)
    with pytest.raises(ValueError, match="num_experts"):
        RoutingMonitor(2, [4])
    with pytest.raises(ValueError, match="unique"):
        RoutingMonitor(["a", "a"], 4)
    mon = RoutingMonitor(1, 4)
    with pytest.raises(ValueError, match=r"tokens_per_expert.*shape \(4,\)"):
        mon.update(0, stats([1, 2, 3], 3))
    with pytest.raises(KeyError, match="num_tokens"):
        mon.update(0, {"tokens_per_expert": torch.zeros(4)})
    with pytest.raises(KeyError, match="unknown layer"):
        mon.update("nope", stats([1, 1, 1, 1], 4))
    with pytest.raises(ValueError, match="observe got 2 outputs"):
        mon.observe([stats([1, 1, 1, 1], 4)] * 2)
