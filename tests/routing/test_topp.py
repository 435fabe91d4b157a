"""TopPRouter: vectorised vs the per-token loop, gradients, experts-per-token counts, slot-major order with a
variable number of experts, contract."""

import math

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights
from moekit.reference.routers_tokenchoice import reference_topp
from moekit.routing.registry import build_router
from moekit.routing.topp import TopPRouter

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(dtype, T=16, D=6, E=6, max_k=4, seed=0, **kw):
    torch.manual_seed(seed)
    router = TopPRouter(D, E, max_k, **kw).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


def assert_same_routing(got, want, dtype):
    got.validate()
    got_w, want_w = pair_weights(got), pair_weights(want)
    assert set(got_w) == set(want_w)
    for pair, w in want_w.items():
        torch.testing.assert_close(got_w[pair], w, **TOL[dtype])
    assert got.token_idx.tolist() == want.token_idx.tolist()
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    torch.testing.assert_close(got.logits, want.logits, **TOL[dtype])
    torch.testing.assert_close(got.probs, want.probs, **TOL[dtype])
    assert got.stats["mean_experts_per_token"] == pytest.approx(want.stats["mean_experts_per_token"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p,min_k,max_k", [(0.5, 1, 4), (0.8, 2, 3), (0.3, 1, 6), (1.0, 1, 6)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_matches_reference(dtype, p, min_k, max_k, renormalize):
    router, x = make(dtype, p=p, min_k=min_k, max_k=max_k, renormalize=renormalize)
    got = router(x)
    assert_same_routing(got, reference_topp(router, x), dtype)
    assert got.weight.dtype == dtype


def test_reference_cases_vary_the_count():
    router, x = make(torch.float64, p=0.5)
    assert len(set(router(x).experts_per_token().tolist())) > 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("renormalize", [False, True])
def test_gradients_match_reference(dtype, renormalize):
    router, x = make(dtype, p=0.6, renormalize=renormalize)
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E) weight of each pair in the loss
    params = [x, router.weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_topp(router, x)), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize(
    "p,min_k,max_k,count",
    [
        (0.45, 1, 4, 1),  # 0.5 >= 0.45
        (0.6, 1, 4, 2),  # 0.5 < 0.6 <= 0.5 + 0.3
        (0.9, 1, 4, 3),  # 0.8 < 0.9 <= 0.95
        (0.97, 1, 4, 4),
        (1.0, 1, 4, 4),  # everything, even if rounding leaves the total a hair under 1
        (0.97, 1, 2, 2),  # capped by max_k
        (0.3, 3, 4, 3),  # raised to min_k
    ],
)
def test_counts_by_hand(p, min_k, max_k, count):
    """One token with probabilities (0.5, 0.3, 0.15, 0.05) over experts (2, 0, 3, 1)."""
    router = TopPRouter(4, 4, max_k, p=p, min_k=min_k)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15])
    routing = router(probs.log().unsqueeze(0))
    assert routing.expert_idx.tolist() == [2, 0, 3, 1][:count]
    torch.testing.assert_close(routing.weight, probs[[2, 0, 3, 1][:count]])


def test_counts_are_minimal_and_within_bounds():
    router, x = make(torch.float64, T=200, E=8, max_k=5, p=0.7, min_k=2)
    routing = router(x)
    n = routing.experts_per_token()
    assert int(n.min()) >= 2 and int(n.max()) <= 5
    sorted_p = routing.probs.detach().sort(dim=-1, descending=True).values
    kept = torch.zeros(200, dtype=torch.float64).index_add(0, routing.token_idx, routing.weight.detach())
    for t in range(200):
        nt = int(n[t])
        torch.testing.assert_close(kept[t], sorted_p[t, :nt].sum())  # the nt most probable experts
        assert kept[t] >= 0.7 or nt == 5  # reaches p unless capped
        assert nt == 2 or sorted_p[t, : nt - 1].sum() < 0.7  # one fewer would not (unless at min_k)
    assert routing.stats["mean_experts_per_token"] == pytest.approx(n.double().mean().item())


def test_slot_major_with_variable_counts():
    router, x = make(torch.float32, T=20, p=0.6)
    routing = router(x)
    n = routing.experts_per_token().tolist()
    want_tokens = [t for slot in range(max(n)) for t in range(20) if n[t] > slot]
    assert routing.token_idx.tolist() == want_tokens
    # Inside each token, experts come best first.
    for t in range(20):
        mine = routing.weight[routing.token_idx == t].detach()
        assert mine.tolist() == sorted(mine.tolist(), reverse=True)
    assert router.fixed_k is False


def test_renormalized_weights_sum_to_one():
    router, x = make(torch.float64, p=0.5, renormalize=True)
    routing = router(x)
    sums = torch.zeros(x.shape[0], dtype=torch.float64).index_add(0, routing.token_idx, routing.weight)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_empty_batch():
    router, _ = make(torch.float32)
    routing = router(torch.zeros(0, 6))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 6)


def test_autocast_keeps_float32():
    router, x = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.detach().bfloat16())
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(max_k=0), ValueError, "max_k"),
        (dict(max_k=7), ValueError, "max_k"),
        (dict(max_k=2.0), TypeError, "max_k"),
        (dict(min_k=0), ValueError, "min_k"),
        (dict(min_k=5), ValueError, "min_k"),
        (dict(p=0.0), ValueError, "p must"),
        (dict(p=1.5), ValueError, "p must"),
        (dict(p=math.nan), ValueError, "p must"),
        (dict(p="0.5"), TypeError, "p must"),
        (dict(renormalize=None), TypeError, "renormalize"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(d_model=6, num_experts=6, max_k=4) | kwargs
    with pytest.raises(exc, match=match):
        TopPRouter(**args)


def test_registry_and_layer():
    router = build_router("topp", d_model=8, num_experts=4, k=3, p=0.7)
    assert isinstance(router, TopPRouter) and (router.max_k, router.p) == (3, 0.7)
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=3, router="topp", router_options=dict(p=0.6), capacity_factor=1.0)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x).output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
