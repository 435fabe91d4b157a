"""RoMA: router-only tuning changes only routers; neighbours, penalty and routing representation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.models import LMConfig, MoETransformerLM
from moekit.retrieval.roma import (
    ClassificationData,
    RouterTuneConfig,
    changed_non_router_parameters,
    forward_task,
    freeze_all_but_routers,
    roma_penalty,
    router_parameter_names,
    successful_neighbors,
    tune_routers,
)

V = 30


def _model(num_experts: int = 4) -> MoETransformerLM:
    torch.manual_seed(0)
    cfg = LMConfig(
        vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=num_experts, k=2, max_seq_len=16
    )
    return MoETransformerLM(cfg).eval()


def _data(n: int = 24, seed: int = 0) -> tuple[ClassificationData, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    seqs = [list(rng.integers(3 + 5 * y, 8 + 5 * y, rng.integers(3, 10))) for y in labels]
    emb = np.eye(3)[labels] + 0.1 * rng.standard_normal((n, 3))
    return ClassificationData.from_token_lists(seqs, labels.tolist(), max_len=12), emb.astype(np.float32)


LABELS = torch.tensor([0, 1, 2])


def test_routing_representation_is_per_layer_distribution():
    model = _model()
    data, _ = _data()
    logits, r, _ = forward_task(model, data, LABELS)
    assert logits.shape == (24, 3) and r.shape == (24, 2 * 4)
    torch.testing.assert_close(r.reshape(24, 2, 4).sum(-1), torch.ones(24, 2))
    # Padding does not change a sample's routing: the same sample alone gives the same representation.
    _, r0, _ = forward_task(model, data.subset(torch.tensor([0])), LABELS)
    torch.testing.assert_close(r[:1], r0)


@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_only_router_parameters_change(lam):
    model = _model()
    data, emb = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routers = set(router_parameter_names(model))
    assert routers == {"blocks.0.ffn.router.weight", "blocks.1.ffn.router.weight"}
    cfg = RouterTuneConfig(epochs=2, batch_size=8, lam=lam, k=3)
    hist = tune_routers(model, data, LABELS, cfg, emb=emb, success=np.ones(len(data), dtype=bool))
    assert len(hist["task"]) == 2 and (hist["roma"][0] > 0) == (lam > 0)
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == (name in routers), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == routers


def test_a_changed_non_router_parameter_is_caught():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert changed_non_router_parameters(model, before) == []
    with torch.no_grad():
        model.blocks[0].ffn.router.weight.add_(1.0)  # routers may change
        assert changed_non_router_parameters(model, before) == []
        model.norm.weight.add_(1.0)
    assert changed_non_router_parameters(model, before) == ["norm.weight"]


def test_successful_neighbors_and_penalty():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.95, 0.0]], dtype=np.float32)
    success = np.array([True, True, True, False, True])
    idx, w = successful_neighbors(emb, success, k=2)
    assert idx.shape == (5, 2)
    for i in range(5):
        assert i not in idx[i] and success[idx[i]].all()
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert set(idx[0]) == {1, 4}
    r = torch.rand(3, 4)
    assert roma_penalty(r, r[:, None, :].expand(3, 2, 4), torch.full((3, 2), 0.5)) == 0
    assert roma_penalty(r, torch.zeros(3, 1, 4), torch.ones(3, 1)) > 0
    with pytest.raises(ValueError, match="two successful"):
        successful_neighbors(emb, np.array([True, False, False, False, False]), 2)


def test_roma_errors():
    cfg = LMConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=0, max_seq_len=16)
    with pytest.raises(ValueError, match="no MoE router"):
        freeze_all_but_routers(MoETransformerLM(cfg))
    data, _ = _data()
    with pytest.raises(ValueError, match="one input embedding per training sample"):
        tune_routers(_model(), data, LABELS, RouterTuneConfig(epochs=1, lam=1.0), emb=None)
    with pytest.raises(ValueError, match="empty"):
        ClassificationData.from_token_lists([[1], []], [0, 1], 8)
