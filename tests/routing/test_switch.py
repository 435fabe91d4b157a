"""SwitchRouter: vectorised vs the per-token loop (same jitter draws), gradients, top-1 contract."""

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights
from moekit.reference.routers_tokenchoice import reference_switch
from moekit.routing.registry import build_router
from moekit.routing.switch import SwitchRouter

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
SEED = 11


def make(dtype, T=10, D=6, E=5, seed=0, **kw):
    torch.manual_seed(seed)
    router = SwitchRouter(D, E, generator=torch.Generator().manual_seed(SEED), **kw).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


def same_uniforms(x):
    """The (T, D) U(0, 1) block the router draws from a generator seeded with SEED."""
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("jitter", [0.0, 0.3])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(dtype, jitter, training):
    router, x = make(dtype, jitter=jitter)
    router.train(training)
    got = router(x)
    assert_same_routing(got, reference_switch(router, x, same_uniforms(x)), dtype)
    assert got.experts_per_token().tolist() == [1] * x.shape[0]
    assert got.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_reference(dtype, training):
    router, x = make(dtype, jitter=0.2)
    router.train(training)
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E) weight of each pair in the loss
    params = [x, router.weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_switch(router, x, same_uniforms(x))), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_weight_is_the_unrenormalised_top_probability():
    router, x = make(torch.float64)
    routing = router(x)
    top_p, top_e = routing.probs.max(dim=-1)
    assert routing.expert_idx.tolist() == top_e.tolist()
    torch.testing.assert_close(routing.weight, top_p, rtol=0, atol=0)
    assert bool((routing.weight < 1).all())


def test_jitter_only_in_training():
    router, x = make(torch.float32, jitter=0.5)
    clean = x @ router.weight.t()
    router.eval()
    torch.testing.assert_close(router(x).logits, clean)
    router.train()
    noisy = router(x).logits
    assert not torch.allclose(noisy, clean)
    router.generator = torch.Generator().manual_seed(SEED)
    assert torch.equal(router(x).logits, noisy)  # reproducible from the generator
    # The multiplier lies in [1 - jitter, 1 + jitter]: recover it from a one-hot token and an identity gate.
    eye = SwitchRouter(4, 4, jitter=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eye.weight.copy_(torch.eye(4))
    factors = eye(torch.ones(64, 4)).logits.detach()
    assert float(factors.min()) >= 0.5 and float(factors.max()) <= 1.5
    assert float(factors.max() - factors.min()) > 0.8  # spread over most of the interval


def test_empty_batch():
    router, _ = make(torch.float32, jitter=0.1)
    routing = router(torch.zeros(0, 6))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 5)


def test_autocast_keeps_float32():
    router, x = make(torch.float32, jitter=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.detach().bfloat16())
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(jitter=-0.1), ValueError, "jitter"),
        (dict(jitter=1.0), ValueError, "jitter"),
        (dict(jitter="0.1"), TypeError, "jitter"),
        (dict(generator=1), TypeError, "generator"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(d_model=1.5), TypeError, "d_model"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(d_model=6, num_experts=5) | kwargs
    with pytest.raises(exc, match=match):
        SwitchRouter(**args)


def test_registry_and_layer():
    router = build_router("switch", d_model=8, num_experts=4, k=1, jitter=0.01)
    assert isinstance(router, SwitchRouter) and (router.jitter, router.k, router.fixed_k) == (0.01, 1, True)
    with pytest.raises(ValueError, match="k"):
        build_router("switch", d_model=8, num_experts=4, k=2)
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=1, router="switch", capacity_factor=1.0)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x).output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
