"""ExpertChoiceRouter: vectorised vs the per-expert sort loop, capacity, unrouted share, eval modes."""

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights, reference_expert_choice
from moekit.routing.expert_choice import ExpertChoiceRouter, expert_choice_capacity
from moekit.routing.registry import build_router

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(dtype, T=12, D=8, E=4, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    router = ExpertChoiceRouter(D, E, k, **kw).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


def assert_same_routing(got, want, dtype):
    got_w, want_w = pair_weights(got), pair_weights(want)
    assert set(got_w) == set(want_w)
    for pair, w in want_w.items():
        torch.testing.assert_close(got_w[pair], w, **TOL[dtype])
    torch.testing.assert_close(got.logits, want.logits, **TOL[dtype])
    torch.testing.assert_close(got.probs, want.probs, **TOL[dtype])
    assert got.stats["unrouted_share"] == pytest.approx(want.stats["unrouted_share"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5, 1.25])
@pytest.mark.parametrize("k", [1, 2])
def test_training_matches_reference(dtype, capacity_factor, k):
    router, x = make(dtype, k=k, capacity_factor=capacity_factor)
    got, want = router(x), reference_expert_choice(router, x)
    got.validate()
    assert_same_routing(got, want, dtype)
    # Expert-major, each expert's tokens best first: the reference emits the same order.
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    assert got.token_idx.tolist() == want.token_idx.tolist()
    assert got.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inference_mode", ["topk", "expert_choice"])
def test_eval_matches_reference(dtype, inference_mode):
    router, x = make(dtype, k=2, inference_mode=inference_mode)
    router.eval()
    got, want = router(x), reference_expert_choice(router, x)
    assert_same_routing(got, want, dtype)
    assert got.token_idx.tolist() == want.token_idx.tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_reference(dtype, training):
    router, x = make(dtype, k=2, capacity_factor=0.75)
    router.train(training)
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E) weight of each pair in the loss
    params = [x, router.weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_expert_choice(router, x)), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_capacity_formula():
    assert expert_choice_capacity(8, 4, 2, 1.0) == 4  # 8 * 2 / 4
    assert expert_choice_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert expert_choice_capacity(10, 4, 1, 0.5) == 2  # ceil(1.25)
    assert expert_choice_capacity(3, 2, 2, 2.0) == 3  # ceil(6) clipped to T


def test_capacity_is_exact_at_integer_boundaries():
    # 100 * 1 * 1.1 / 10 is 11.000000000000002 in floats (ceil 12); the formula means exactly 11.
    assert expert_choice_capacity(100, 10, 1, 1.1) == 11
    assert expert_choice_capacity(100, 10, 1, 2.2) == 22  # 22.000000000000004 in floats
    # Every two-decimal factor against integer arithmetic: ceil(m/100 * T * k / E) = ceil(m * T * k / (100 * E)).
    for m in range(5, 301, 5):
        for T, E, k in ((100, 10, 1), (60, 8, 2), (37, 5, 3), (1000, 64, 8)):
            want = min(T, -(-m * T * k // (100 * E)))
            assert expert_choice_capacity(T, E, k, m / 100) == want, (m, T, E, k)


def test_router_uses_exact_capacity():
    router, x = make(torch.float32, T=100, D=8, E=10, k=1, capacity_factor=1.1)
    routing = router(x)
    assert routing.tokens_per_expert().tolist() == [11] * 10  # not 12 from float rounding


@pytest.mark.parametrize("T,k,capacity_factor", [(10, 1, 1.0), (9, 2, 0.5), (7, 3, 1.5)])
def test_each_expert_takes_exactly_capacity(T, k, capacity_factor):
    router, x = make(torch.float32, T=T, E=4, k=k, capacity_factor=capacity_factor)
    routing = router(x)
    C = router.capacity(T)
    assert routing.tokens_per_expert().tolist() == [C] * 4
    per_token = routing.experts_per_token()
    assert routing.stats["unrouted_share"] == pytest.approx((per_token == 0).float().mean().item())
    # Every expert's C tokens are its C best by score.
    for e in range(4):
        mine = routing.token_idx[routing.expert_idx == e]
        best = routing.probs[:, e].topk(C).indices
        assert sorted(mine.tolist()) == sorted(best.tolist())


def test_unrouted_share_hand_case():
    # Two experts scoring on the first feature only: S[t, 0] = sigmoid(x_t0 - x_t1) decreases with the token
    # index, so expert 0 takes tokens 0, 1 and expert 1 takes tokens 5, 4; tokens 2 and 3 go nowhere.
    router = ExpertChoiceRouter(2, 2, k=1, capacity_factor=0.5)  # C = ceil(6 * 1 * 0.5 / 2) = 2
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    x = torch.tensor([[3.0, 0], [2, 0], [1, 0], [-1, 0], [-2, 0], [-3, 0]])
    routing = router(x)
    assert routing.expert_idx.tolist() == [0, 0, 1, 1]
    assert routing.token_idx.tolist() == [0, 1, 5, 4]
    assert routing.stats["unrouted_share"] == pytest.approx(2 / 6)


def test_capacity_clipped_to_all_tokens():
    router, x = make(torch.float32, T=3, E=2, k=2, capacity_factor=2.0)
    routing = router(x)
    assert routing.experts_per_token().tolist() == [2, 2, 2]
    assert routing.stats["unrouted_share"] == 0.0


def test_eval_topk_is_token_choice():
    router, x = make(torch.float32, k=2)
    router.eval()
    routing = router(x)
    assert routing.experts_per_token().tolist() == [2] * x.shape[0]
    top = routing.probs.topk(2, dim=-1)
    # Slot-major: first choices of all tokens, then second choices; weights are the unnormalised scores.
    assert routing.expert_idx.tolist() == top.indices.t().reshape(-1).tolist()
    torch.testing.assert_close(routing.weight, top.values.t().reshape(-1))


def test_eval_expert_choice_mode_equals_training():
    router, x = make(torch.float32, inference_mode="expert_choice")
    train = router(x)
    router.eval()
    ev = router(x)
    assert ev.token_idx.tolist() == train.token_idx.tolist()
    assert ev.expert_idx.tolist() == train.expert_idx.tolist()


def test_empty_batch():
    router, _ = make(torch.float32)
    routing = router(torch.zeros(0, 8))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 4)


def test_autocast_keeps_float32():
    router, x = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.detach().bfloat16())
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(k=0), ValueError, "k"),
        (dict(k=5), ValueError, "k"),
        (dict(k=1.5), TypeError, "k"),
        (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
        (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
        (dict(capacity_factor="1"), TypeError, "capacity_factor"),
        (dict(inference_mode="greedy"), ValueError, "inference_mode"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ExpertChoiceRouter(8, 4, **kwargs)


def test_bad_sizes():
    with pytest.raises(ValueError, match="d_model"):
        ExpertChoiceRouter(0, 4)
    with pytest.raises(ValueError, match="num_experts"):
        ExpertChoiceRouter(8, 0)


def test_registry_builds_router():
    router = build_router("expert_choice", d_model=8, num_experts=4, k=2, capacity_factor=1.5)
    assert isinstance(router, ExpertChoiceRouter)
    assert (router.k, router.capacity_factor, router.fixed_k) == (2, 1.5, False)


def test_layer_matches_reference_loop():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="expert_choice", router_options=dict(capacity_factor=0.5))
    x = torch.randn(2, 5, 8)
    out = layer(x)
    ref = reference_forward(layer, x)
    torch.testing.assert_close(out.output, ref.output, rtol=1e-5, atol=1e-5)
    assert "unrouted_share" in out.stats
