"""SinkhornRouter (S-BASE): vectorised vs the per-row/per-column loop, balance, gradients, eval top-k."""

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights, reference_sinkhorn, reference_sinkhorn_matrix
from moekit.routing.registry import build_router
from moekit.routing.sinkhorn import SinkhornRouter, sinkhorn_log

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(dtype, T=12, D=8, E=4, k=1, seed=0, **kw):
    torch.manual_seed(seed)
    router = SinkhornRouter(D, E, k, **kw).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_matches_reference(dtype, k, training, eps):
    router, x = make(dtype, k=k, eps=eps)
    router.train(training)
    got, want = router(x), reference_sinkhorn(router, x)
    got.validate()
    assert got.token_idx.tolist() == want.token_idx.tolist()  # same slot-major order
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    got_w, want_w = pair_weights(got), pair_weights(want)
    for pair, w in want_w.items():
        torch.testing.assert_close(got_w[pair], w, **TOL[dtype])
    torch.testing.assert_close(got.logits, want.logits, **TOL[dtype])
    torch.testing.assert_close(got.probs, want.probs, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2])
def test_gradients_match_reference(dtype, k):
    router, x = make(dtype, k=k)
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E)
    params = [x, router.weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_sinkhorn(router, x)), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_gate_is_sigmoid_for_k1_softmax_for_k2():
    for k in (1, 2):
        router, x = make(torch.float64, k=k)
        routing = router(x)
        full = routing.logits.sigmoid() if k == 1 else routing.logits.softmax(-1)
        torch.testing.assert_close(routing.weight, full[routing.token_idx, routing.expert_idx])


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    T, E = 24, 4
    logits = 2 * torch.randn(T, E, dtype=torch.float64)
    P = sinkhorn_log(logits, n_iters=200).exp()
    torch.testing.assert_close(P.sum(0), torch.full((E,), T / E, dtype=torch.float64))  # columns exact
    torch.testing.assert_close(P.sum(1), torch.ones(T, dtype=torch.float64))  # rows converged
    want = torch.tensor(reference_sinkhorn_matrix(logits.tolist(), n_iters=8), dtype=torch.float64)
    torch.testing.assert_close(sinkhorn_log(logits, n_iters=8).exp(), want)


def test_early_stop_meets_tolerance():
    torch.manual_seed(1)
    logits = 2 * torch.randn(16, 4, dtype=torch.float64)
    P = sinkhorn_log(logits, n_iters=1000, eps=1e-4).exp()
    assert (P.sum(1) - 1).abs().max() < 1e-4
    want = torch.tensor(reference_sinkhorn_matrix(logits.tolist(), n_iters=1000, eps=1e-4), dtype=torch.float64)
    torch.testing.assert_close(P, want)


def test_large_logits_stay_finite():
    logits = 1000 * torch.randn(32, 4)
    log_p = sinkhorn_log(logits, n_iters=20)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(0), torch.full((4,), 8.0))


def test_training_assignment_is_balanced_where_top1_collapses():
    # Expert 0's logit is +3 for every token (feature 0 is a constant 1): plain top-1 sends nearly all tokens
    # there, the Sinkhorn-balanced choice spreads them.
    router, x = make(torch.float32, T=64, k=1)
    with torch.no_grad():
        router.weight[0, 0] = 3.0
        x[:, 0] = 1.0
    balanced = router(x)
    P = sinkhorn_log(balanced.logits.detach(), router.n_iters).exp()
    torch.testing.assert_close(P.sum(0), torch.full((4,), 16.0))  # column sums T/E
    assert balanced.tokens_per_expert().max() <= 2 * 64 / 4
    assert balanced.tokens_per_expert().min() > 0
    router.eval()
    assert router(x).tokens_per_expert()[0] > 0.9 * 64


def test_empty_batch():
    router, _ = make(torch.float32)
    routing = router(torch.zeros(0, 8))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 4)


def test_autocast_keeps_float32():
    router, x = make(torch.float32, k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.detach().bfloat16())
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(k=0), ValueError, "k"),
        (dict(k=5), ValueError, "k"),
        (dict(n_iters=0), ValueError, "n_iters"),
        (dict(n_iters=2.0), TypeError, "n_iters"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-3), ValueError, "eps"),
        (dict(eps="small"), TypeError, "eps"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SinkhornRouter(8, 4, **kwargs)


def test_registry_and_layer():
    router = build_router("sinkhorn", d_model=8, num_experts=4, k=2, n_iters=4)
    assert isinstance(router, SinkhornRouter) and (router.k, router.n_iters) == (2, 4)
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="sinkhorn")
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x).output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
