"""Hecto: heterogeneous GRU / FFN experts behind one top-1 gate; parameter matching, routing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moekit.bench.common import num_threads
from moekit.experts.heterogeneous import FFNExpert, GRUExpert
from moekit.tabular.hecto import (
    MODELS,
    HectoClassifier,
    HectoConfig,
    StaticFFNExpert,
    VerseData,
    build_models,
    count_params,
    ffn_params,
    gru_params,
    make_experts,
    predict,
    routing_report,
    train_model,
)

STEPS, EMB = 5, 4
D = STEPS * EMB


def test_param_formulas_match_modules():
    assert count_params(GRUExpert(D, STEPS, 7)) == gru_params(D, STEPS, 7)
    assert count_params(FFNExpert(D, 9)) == ffn_params(D, 9)
    assert count_params(StaticFFNExpert(D, EMB, 9)) == ffn_params(D, 9, static_width=EMB)


def test_static_ffn_expert_reads_only_the_static_slot():
    expert = StaticFFNExpert(D, EMB, 6)
    x = torch.randn(3, D)
    y = x.clone()
    y[:, EMB:] = torch.randn(3, D - EMB)  # change every token slot, keep the static one
    torch.testing.assert_close(expert(x), expert(y))
    with pytest.raises(ValueError, match="static_width must be in"):
        StaticFFNExpert(D, D + 1, 4)


def test_models_have_about_equal_parameters():
    models = build_models(HectoConfig(steps=9, embed_dim=8, gru_hidden=16), vocab_size=100, n_classes=6)
    assert set(models) == set(MODELS)
    sizes = [count_params(m) for m in models.values()]
    assert max(sizes) / min(sizes) < 1.03
    kinds = [type(e).__name__ for e in models["hecto"].moe.experts.experts]
    assert kinds == ["GRUExpert", "GRUExpert", "StaticFFNExpert", "StaticFFNExpert"]
    assert models["single_gru"].moe is None


def _toy(n: int = 96, seed: int = 0) -> VerseData:
    """Class 0: token order matters (1 then 2); class 1: the reverse. Same bag of words, so only a sequence
    model separates them; a GRU expert is needed."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    tokens = torch.randint(3, 10, (n, STEPS - 1), generator=g)
    tokens[:, 0] = torch.where(labels == 0, 1, 2)
    tokens[:, 1] = torch.where(labels == 0, 2, 1)
    return VerseData(tokens, labels, np.full(n, STEPS - 1), [str(i) for i in range(n)])


def test_hecto_routes_every_row_to_one_expert_and_learns_order():
    torch.manual_seed(0)
    cfg = HectoConfig(steps=STEPS, embed_dim=EMB, gru_hidden=16, epochs=25, batch_size=32, learning_rate=1e-2)
    experts = make_experts(["gru", "ffn"], D, STEPS, 16, 8)
    model = HectoClassifier(10, 2, STEPS, EMB, experts=experts)
    data = _toy()
    with num_threads(1):  # tiny ops: one thread avoids thread-pool overhead on a busy machine
        train_model(model, data, cfg, seed=0)
    pred, chosen = predict(model, data)
    assert chosen.shape == (96,) and set(np.unique(chosen)) <= {0, 1}
    assert (pred == data.labels.numpy()).mean() > 0.9  # the order signal is learnt (bag of words alone: 50%)
    rep = routing_report(chosen, ["gru", "ffn"], data, ["a", "b"], pred == data.labels.numpy())
    assert abs(sum(rep["expert_share"]) - 1) < 1e-6
    assert rep["gru_share"] == pytest.approx(float((chosen == 0).mean()), abs=1e-4)
    assert set(rep["per_part"]) == {"a", "b"}


def test_forward_shapes_and_gradients_reach_router():
    model = HectoClassifier(10, 3, STEPS, EMB, experts=make_experts(["gru", "ffn", "ffn"], D, STEPS, 4, 4))
    tokens = torch.randint(0, 10, (7, STEPS - 1))
    logits, aux, chosen = model(tokens)
    assert logits.shape == (7, 3) and chosen.shape == (7,) and aux.dim() == 0
    (logits.sum() + aux).backward()
    assert model.moe.router.weight.grad is not None and model.moe.router.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- bad input
def test_empty_expert_list():
    with pytest.raises(ValueError, match="empty list"):
        HectoClassifier(10, 2, STEPS, EMB, experts=[])
    with pytest.raises(ValueError, match="kinds is empty"):
        make_experts([], D, STEPS, 4, 4)


def test_mismatched_expert_widths():
    with pytest.raises(ValueError, match=r"experts\[1\] does not accept input of width d_model=20"):
        HectoClassifier(10, 2, STEPS, EMB, experts=[FFNExpert(D, 4), FFNExpert(D + 1, 4)])
    with pytest.raises(ValueError, match=r"experts\[0\] must map \(n, 20\) to \(n, 20\)"):
        HectoClassifier(10, 2, STEPS, EMB, experts=[nn.Linear(D, 3)])


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of experts"):
        HectoClassifier(10, 2, STEPS, EMB)
    with pytest.raises(ValueError, match=r"kinds\[0\] must be one of"):
        make_experts(["lstm"], D, STEPS, 4, 4)
    with pytest.raises(ValueError, match="HectoConfig.num_experts must be >= 2"):
        HectoConfig(num_experts=1)
    with pytest.raises(ValueError, match="HectoConfig.steps"):
        HectoConfig(steps=0)
