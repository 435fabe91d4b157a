"""BaseRouter (BASE layers): balanced assignment optimal vs brute force, balance, gradients, eval top-1."""

import numpy as np
import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import reference_base
from moekit.routing.base_layer import BaseRouter, balanced_assignment
from moekit.routing.registry import build_router

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(dtype, T=6, D=8, E=3, seed=0, **kw):
    torch.manual_seed(seed)
    router = BaseRouter(D, E, **kw).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "T,E,capacity",
    [(6, 3, None), (7, 3, None), (5, 2, None), (2, 4, None), (8, 2, None), (5, 2, 4), (6, 3, 3)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_training_assignment_is_optimal(dtype, T, E, capacity, seed):
    router, x = make(dtype, T=T, E=E, capacity=capacity, seed=seed)
    got, want = router(x), reference_base(router, x)  # reference: brute force over all E**T assignments
    got.validate()
    assert got.token_idx.tolist() == list(range(T))
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    torch.testing.assert_close(got.weight, want.weight, **TOL[dtype])
    torch.testing.assert_close(got.logits, want.logits, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_is_top1(dtype):
    router, x = make(dtype, T=10)
    router.eval()
    got, want = router(x), reference_base(router, x)
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    assert got.expert_idx.tolist() == got.logits.argmax(-1).tolist()
    torch.testing.assert_close(got.weight, want.weight, **TOL[dtype])


@pytest.mark.parametrize("T,E", [(13, 4), (32, 8), (3, 5), (40, 4)])
def test_training_assignment_is_balanced(T, E):
    router, x = make(torch.float32, T=T, E=E)
    with torch.no_grad():
        router.weight[0] += 5 * x[0]  # a skewed gate: top-1 would favour expert 0
    counts = router(x).tokens_per_expert()
    assert counts.sum() == T
    assert counts.min() >= T // E and counts.max() <= -(-T // E)


def test_capacity_is_an_upper_bound():
    router, x = make(torch.float32, T=10, E=4, capacity=5)
    counts = router(x).tokens_per_expert()
    assert counts.sum() == 10 and counts.max() <= 5


def test_balanced_assignment_brute_force_numpy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        aff = rng.normal(size=(7, 3))
        expert = balanced_assignment(aff)
        counts = np.bincount(expert, minlength=3)
        assert counts.min() == 2 and counts.max() == 3
        best = -np.inf
        for code in range(3**7):
            a = [(code // 3**t) % 3 for t in range(7)]
            c = np.bincount(a, minlength=3)
            if c.min() >= 2 and c.max() <= 3:
                best = max(best, aff[np.arange(7), a].sum())
        assert aff[np.arange(7), expert].sum() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_reference(dtype, training):
    router, x = make(dtype, T=7, E=3)
    router.train(training)
    coef = torch.randn(7, 3, dtype=dtype)  # (T, E)
    params = [x, router.weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_base(router, x)), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_weight_is_sigmoid_of_affinity():
    router, x = make(torch.float64, T=9)
    routing = router(x)
    torch.testing.assert_close(routing.weight, routing.logits[torch.arange(9), routing.expert_idx].sigmoid())


def test_empty_batch():
    router, _ = make(torch.float32)
    routing = router(torch.zeros(0, 8))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 3)


def test_capacity_too_small_for_batch():
    router, x = make(torch.float32, T=10, E=3, capacity=3)
    with pytest.raises(ValueError, match="capacity"):
        router(x)
    router.eval()  # eval is top-1: no assignment, no capacity
    assert router(x).num_pairs == 10


def test_cost_matrix_limit():
    router, x = make(torch.float32, T=40, E=4, max_cost_entries=1000)
    with pytest.raises(ValueError, match="max_cost_entries"):
        router(x)
    router.eval()
    assert router(x).num_pairs == 40


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(capacity=0), ValueError, "capacity"),
        (dict(capacity=2.0), TypeError, "capacity"),
        (dict(max_cost_entries=0), ValueError, "max_cost_entries"),
        (dict(max_cost_entries=None), TypeError, "max_cost_entries"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BaseRouter(8, 4, **kwargs)


def test_registry_and_layer():
    assert isinstance(build_router("base", d_model=8, num_experts=4, k=1), BaseRouter)
    with pytest.raises(ValueError, match="k"):
        build_router("base", d_model=8, num_experts=4, k=2)
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=1, router="base")
    x = torch.randn(2, 6, 8)
    out = layer(x)
    torch.testing.assert_close(out.output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
    assert out.stats["tokens_per_expert"].tolist() == [3, 3, 3, 3]
