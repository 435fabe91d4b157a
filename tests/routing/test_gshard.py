"""GShardRouter: vectorised vs the per-token loop (same uniforms), gradients, random routing frequency of the
second expert, threshold, variable experts per token, contract."""

import math

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights
from moekit.reference.routers_tokenchoice import reference_gshard
from moekit.routing.gshard import GShardRouter
from moekit.routing.registry import build_router

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
SEED = 5


def make(dtype, T=16, D=6, E=5, seed=0, **kw):
    torch.manual_seed(seed)
    router = GShardRouter(D, E, generator=torch.Generator().manual_seed(SEED), **kw).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


def same_uniforms(x):
    """The (T,) U(0, 1) block the router draws from a generator seeded with SEED."""
    return torch.rand(x.shape[0], generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)


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
    assert got.stats["second_expert_share"] == pytest.approx(want.stats["second_expert_share"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("random_routing,threshold", [(True, 0.0), (True, 0.2), (False, 0.3), (False, 0.0)])
def test_matches_reference(dtype, training, random_routing, threshold):
    router, x = make(dtype, random_routing=random_routing, second_expert_threshold=threshold)
    router.train(training)
    got = router(x)
    assert_same_routing(got, reference_gshard(router, x, same_uniforms(x)), dtype)
    assert got.weight.dtype == dtype


def test_reference_cases_are_not_trivial():
    """The settings above do drop some second pairs and keep others (so the comparison means something)."""
    router, x = make(torch.float64)
    share = router(x).stats["second_expert_share"]
    assert 0 < share < 1
    router, x = make(torch.float64, random_routing=False, second_expert_threshold=0.3)
    share = router(x).stats["second_expert_share"]
    assert 0 < share < 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_reference(dtype, training):
    router, x = make(dtype)
    router.train(training)
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E) weight of each pair in the loss
    params = [x, router.weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_gshard(router, x, same_uniforms(x))), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_second_expert_kept_with_probability_two_g2():
    """Three token types with known gates, N copies each: the kept count of each is Binomial(N, 2 g2).

    W = I and logits (d, 0, -9, -9) give g2 = 1 / (1 + e^d) over the two best. A 5-sigma bound on each
    observed frequency fails by chance with probability < 1e-6 per type (normal approximation, N p(1-p) >> 1).
    """
    N, gaps = 4000, [0.2, 1.0, 3.0]
    router = GShardRouter(4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = torch.tensor([[d, 0.0, -9.0, -9.0] for d in gaps]).repeat_interleave(N, dim=0)  # (3N, 4)
    routing = router(x)
    kept = routing.experts_per_token() == 2  # (3N,)
    for i, d in enumerate(gaps):
        p = 2 / (1 + math.exp(d))
        freq = kept[i * N : (i + 1) * N].double().mean().item()
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / N), (d, freq, p)
    # Dropped tokens keep g1 = p1 / (p1 + p2) unrenormalised; kept ones also get their second expert 1.
    first = routing.weight[: 3 * N]
    torch.testing.assert_close(first, (1 / (1 + torch.exp(-torch.tensor(gaps)))).repeat_interleave(N))
    assert set(routing.expert_idx[3 * N :].tolist()) == {1}


def test_slot_major_with_dropped_seconds():
    router, x = make(torch.float32, T=32)
    routing = router(x)
    T = x.shape[0]
    assert routing.token_idx[:T].tolist() == list(range(T))  # every token's first choice, in order
    second = routing.token_idx[T:].tolist()
    assert second == sorted(second) and len(second) < T  # then the kept seconds, in token order
    assert set(routing.experts_per_token().tolist()) <= {1, 2}
    assert router.fixed_k is False


def test_eval_keeps_both_unless_below_threshold():
    router, x = make(torch.float64, T=32)
    router.eval()
    routing = router(x)
    assert routing.experts_per_token().tolist() == [2] * 32
    sums = torch.zeros(32, dtype=torch.float64).index_add(0, routing.token_idx, routing.weight)
    torch.testing.assert_close(sums, torch.ones(32, dtype=torch.float64))  # normalised over the two
    g2 = routing.weight[32:].detach()
    router.second_expert_threshold = float(g2.median())
    kept = router(x).experts_per_token() == 2
    assert kept.tolist() == (g2 >= g2.median()).tolist()


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
        (dict(num_experts=1), ValueError, "num_experts"),
        (dict(second_expert_threshold=0.6), ValueError, "second_expert_threshold"),
        (dict(second_expert_threshold=-0.1), ValueError, "second_expert_threshold"),
        (dict(second_expert_threshold=None), TypeError, "second_expert_threshold"),
        (dict(random_routing="yes"), TypeError, "random_routing"),
        (dict(generator="seed"), TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(d_model=6, num_experts=5) | kwargs
    with pytest.raises(exc, match=match):
        GShardRouter(**args)


def test_registry_and_layer():
    router = build_router("gshard", d_model=8, num_experts=4, k=2, second_expert_threshold=0.1)
    assert isinstance(router, GShardRouter) and router.second_expert_threshold == 0.1
    with pytest.raises(ValueError, match="k"):
        build_router("gshard", d_model=8, num_experts=4, k=1)
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="gshard", capacity_factor=1.0).eval()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x).output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
