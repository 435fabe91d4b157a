"""TopKRouter: vectorised vs the per-token loop (both orders, renormalise on/off), gradients, contract."""

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights
from moekit.reference.routers_tokenchoice import reference_topk
from moekit.routing.registry import build_router
from moekit.routing.topk import TopKRouter

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
VARIANTS = [
    ("softmax_then_topk", True),
    ("softmax_then_topk", False),
    ("topk_then_softmax", True),
    ("topk_then_softmax", False),  # renormalize does not apply to this order
]


def make(dtype, T=9, D=6, E=5, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    router = TopKRouter(D, E, k, **kw).to(dtype)
    if router.bias is not None:
        with torch.no_grad():
            router.bias.normal_()
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


def assert_same_routing(got, want, dtype):
    got.validate()
    got_w, want_w = pair_weights(got), pair_weights(want)
    assert set(got_w) == set(want_w)
    for pair, w in want_w.items():
        torch.testing.assert_close(got_w[pair], w, **TOL[dtype])
    # Same slot-major order, not just the same pairs.
    assert got.token_idx.tolist() == want.token_idx.tolist()
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    torch.testing.assert_close(got.logits, want.logits, **TOL[dtype])
    torch.testing.assert_close(got.probs, want.probs, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order,renormalize", VARIANTS)
@pytest.mark.parametrize("k,bias", [(1, False), (2, True), (3, False)])
def test_matches_reference(dtype, order, renormalize, k, bias):
    router, x = make(dtype, k=k, order=order, renormalize=renormalize, bias=bias)
    got = router(x)
    assert_same_routing(got, reference_topk(router, x), dtype)
    assert got.weight.dtype == dtype
    assert got.experts_per_token().tolist() == [k] * x.shape[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order,renormalize", VARIANTS)
def test_gradients_match_reference(dtype, order, renormalize):
    router, x = make(dtype, k=2, order=order, renormalize=renormalize, bias=True)
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E) weight of each pair in the loss
    params = [x, router.weight, router.bias]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_topk(router, x)), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_orders_agree_when_renormalised():
    # Mixtral's softmax over the top-k logits is softmax-then-renormalise computed differently.
    a, x = make(torch.float64, k=3, order="topk_then_softmax")
    b = TopKRouter(6, 5, 3, order="softmax_then_topk", renormalize=True).double()
    b.load_state_dict(a.state_dict())
    ra, rb = a(x), b(x)
    assert ra.expert_idx.tolist() == rb.expert_idx.tolist()
    torch.testing.assert_close(ra.weight, rb.weight, rtol=1e-12, atol=1e-12)


def test_unrenormalised_weights_are_the_probabilities():
    router, x = make(torch.float64, k=2, renormalize=False)
    routing = router(x)
    torch.testing.assert_close(routing.weight, routing.probs[routing.token_idx, routing.expert_idx])
    sums = torch.zeros(x.shape[0], dtype=torch.float64).index_add(0, routing.token_idx, routing.weight)
    assert bool((sums < 1).all())


def test_empty_batch():
    router, _ = make(torch.float32)
    routing = router(torch.zeros(0, 6))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 5)


def test_autocast_keeps_float32():
    router, x = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.detach().bfloat16())
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(k=0), ValueError, "k"),
        (dict(k=6), ValueError, "k"),
        (dict(k=2.0), TypeError, "k"),
        (dict(order="mixtral"), ValueError, "order"),
        (dict(d_model=0), ValueError, "d_model"),
        (dict(num_experts=0), ValueError, "num_experts"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(d_model=6, num_experts=5, k=2) | kwargs
    with pytest.raises(exc, match=match):
        TopKRouter(**args)


@pytest.mark.parametrize(
    "name,order,renormalize",
    [
        ("topk", "softmax_then_topk", True),
        ("mixtral", "topk_then_softmax", True),
        ("qwen", "softmax_then_topk", False),
    ],
)
def test_registry(name, order, renormalize):
    router = build_router(name, d_model=6, num_experts=5, k=2)
    assert isinstance(router, TopKRouter)
    assert (router.order, router.renormalize, router.k) == (order, renormalize, 2)


def test_layer_matches_reference_loop():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="mixtral")
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x).output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
