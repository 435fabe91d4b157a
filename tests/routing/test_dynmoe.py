"""TopAnyRouter (DynMoE): vectorised vs the per-token threshold loop, straight-through gradients, fallback,
diversity loss, and growing/shrinking E."""

import pytest
import torch
from torch.nn import functional as F

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights, reference_top_any
from moekit.routing.dynmoe import TopAnyRouter
from moekit.routing.registry import build_router

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(dtype=torch.float32, T=16, D=8, E=4, seed=0, thresholds=(0.0, 0.2, 0.4, 0.6), **kw):
    torch.manual_seed(seed)
    router = TopAnyRouter(D, E, **kw).to(dtype)
    if thresholds is not None:
        with torch.no_grad():
            router.thresholds.copy_(torch.tensor(thresholds, dtype=dtype))
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(dtype, training):
    router, x = make(dtype)
    router.train(training)
    got, want = router(x), reference_top_any(router, x)
    got.validate()
    per_token = got.experts_per_token()
    assert (per_token > 1).any() and got.stats["fallback_share"] > 0  # both paths exercised
    assert got.token_idx.tolist() == want.token_idx.tolist()  # same slot-major order
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    got_w, want_w = pair_weights(got), pair_weights(want)
    for pair, w in want_w.items():
        torch.testing.assert_close(got_w[pair], w, **TOL[dtype])
    torch.testing.assert_close(got.logits, want.logits, **TOL[dtype])
    torch.testing.assert_close(got.probs, want.probs, **TOL[dtype])
    torch.testing.assert_close(got.losses["diversity"], want.losses["diversity"], **TOL[dtype])
    assert got.stats["fallback_share"] == pytest.approx(want.stats["fallback_share"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_reference(dtype):
    router, x = make(dtype)
    with torch.no_grad():  # away from the orthogonal init, where the (unsquared) norm has a kink at 0
        router.gate_vectors.add_(0.3 * torch.randn_like(router.gate_vectors))
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E)
    params = [x, router.gate_vectors, router.thresholds]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        loss = loss + routing.losses["diversity"]
        return torch.autograd.grad(loss, params)

    for got, want in zip(grads(router(x)), grads(reference_top_any(router, x)), strict=True):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_straight_through_gradient_reaches_thresholds():
    # Expert 0 is always active (threshold -10, so no fallback) and expert 3 never (threshold 10), so only
    # experts 0..2 may get a threshold gradient. With f = sum of weights, the masked softmax part sums to a
    # constant per token, so df/dG_e = -sigmoid'(G_e) * sum_{t selects e} softmax_t(e) exactly.
    router, x = make(torch.float64, thresholds=(-10.0, 0.1, 0.2, 10.0))
    routing = router(x)
    assert routing.stats["fallback_share"] == 0.0
    assert (routing.expert_idx != 3).all()
    routing.weight.sum().backward()
    soft = torch.zeros(x.shape[0], 4, dtype=torch.float64)
    soft[routing.token_idx, routing.expert_idx] = routing.weight.detach()  # forward weights = softmax values
    G = router.thresholds.detach()
    want = -(G.sigmoid() * (1 - G.sigmoid())) * soft.sum(0)
    torch.testing.assert_close(router.thresholds.grad, want)
    assert (router.thresholds.grad[:3] != 0).all() and router.thresholds.grad[3] == 0


def test_fallback_to_top1_when_no_expert_passes():
    router, x = make(torch.float32, init_threshold=10.0, thresholds=None)  # sigmoid(10) > any sigmoid(cos)
    routing = router(x)
    assert routing.stats["fallback_share"] == 1.0
    assert routing.token_idx.tolist() == list(range(x.shape[0]))
    cos = F.cosine_similarity(x.detach().unsqueeze(1), router.gate_vectors.detach().unsqueeze(0), dim=-1)
    assert routing.expert_idx.tolist() == cos.argmax(-1).tolist()
    torch.testing.assert_close(routing.weight, torch.ones(x.shape[0]), rtol=0, atol=0)
    routing.weight.sum().backward()
    assert (router.thresholds.grad[routing.expert_idx.unique()] != 0).all()  # fallback pairs teach G too


def test_every_expert_when_thresholds_are_low():
    router, x = make(torch.float64, init_threshold=-10.0, thresholds=None)
    routing = router(x)
    assert routing.experts_per_token().tolist() == [4] * x.shape[0]
    assert routing.stats["fallback_share"] == 0.0
    w = torch.zeros(x.shape[0], 4, dtype=torch.float64)
    w[routing.token_idx, routing.expert_idx] = routing.weight.detach()
    torch.testing.assert_close(w, routing.logits.detach().softmax(-1))
    # Slot-major by score: slot 0 holds every token's best expert.
    assert routing.expert_idx[: x.shape[0]].tolist() == routing.logits.argmax(-1).tolist()


def test_weights_sum_to_one_per_token():
    router, x = make(torch.float64)
    routing = router(x)
    sums = torch.zeros(x.shape[0], dtype=torch.float64).index_add(0, routing.token_idx, routing.weight)
    torch.testing.assert_close(sums, torch.ones(x.shape[0], dtype=torch.float64))


def test_diversity_loss_values():
    router = TopAnyRouter(2, 2)
    with torch.no_grad():
        router.gate_vectors.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    loss = router(torch.randn(3, 2)).losses["diversity"]
    torch.testing.assert_close(loss, torch.tensor(2.0).sqrt())  # W W^T - I = [[0, 1], [1, 0]]
    orth = TopAnyRouter(8, 4)(torch.randn(3, 8)).losses["diversity"]  # orthogonal init, E <= D
    assert orth < 1e-5


def test_records_and_add_expert():
    router, x = make(torch.float32, thresholds=(0.3, 0.3, 0.3, 0.3))
    routing = router(x)
    passes = routing.logits.detach().sigmoid() > router.thresholds.detach().sigmoid()  # (T, E)
    unrouted = (~passes.any(dim=1)).nonzero().squeeze(1)
    assert len(unrouted) == round(routing.stats["fallback_share"] * x.shape[0]) > 0
    assert router.unrouted_count == len(unrouted)
    assert router.activation_counts.tolist() == passes.sum(0).tolist()
    assert router.needs_new_expert()
    old_vectors = router.gate_vectors.detach().clone()

    idx = router.add_expert()
    assert idx == 4 and router.num_experts == 5
    assert router.gate_vectors.shape == (5, 8) and router.thresholds.shape == (5,)
    torch.testing.assert_close(router.gate_vectors[:4].detach(), old_vectors)
    want = F.normalize(x.detach()[unrouted].sum(0), dim=0)
    torch.testing.assert_close(router.gate_vectors[4].detach(), want)
    assert router.thresholds[4].item() == router.init_threshold
    assert not router.needs_new_expert()  # unrouted records consumed
    assert router.activation_counts.shape == (5,)
    out = router(x)
    out.validate()
    assert out.num_experts == 5 and out.logits.shape == (x.shape[0], 5)


def test_remove_expert_and_unused_window():
    router, x = make(torch.float32, thresholds=(-10.0, 10.0, -10.0, -10.0), removal_window=2)
    router(x)  # expert 1 is never activated (it may still be a fallback: there is none here)
    assert router.unused_experts() == []  # window not complete
    router.after_optimizer_step(torch.zeros(4, dtype=torch.long))
    router.after_optimizer_step(torch.zeros(4, dtype=torch.long))
    assert router.unused_experts() == [1]
    kept = router.gate_vectors.detach()[[0, 2, 3]].clone()
    router.remove_expert(1)
    assert router.num_experts == 3 and router.thresholds.tolist() == [-10.0, -10.0, -10.0]
    torch.testing.assert_close(router.gate_vectors.detach(), kept)
    assert router.activation_counts.shape == (3,)
    router.reset_records()
    assert router.steps_recorded == 0 and router.unused_experts() == []
    assert router(x).num_experts == 3


def test_eval_does_not_record():
    router, x = make(torch.float32)
    router.eval()
    router(x)
    assert router.activation_counts.sum() == 0 and router.unrouted_count == 0
    router.train()
    router(x)
    assert router.activation_counts.sum() > 0


def test_resize_errors():
    router, _ = make(torch.float32, max_experts=5)
    router.add_expert()
    with pytest.raises(ValueError, match="max_experts"):
        router.add_expert()
    with pytest.raises(ValueError, match="e must lie"):
        router.remove_expert(5)
    with pytest.raises(TypeError, match="e must be an int"):
        router.remove_expert(1.0)
    single = TopAnyRouter(8, 1)
    with pytest.raises(ValueError, match="last expert"):
        single.remove_expert(0)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        router.after_optimizer_step(torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(max_experts=3), ValueError, "max_experts"),
        (dict(max_experts=5.0), TypeError, "max_experts"),
        (dict(init_threshold=float("nan")), ValueError, "init_threshold"),
        (dict(init_threshold="0"), TypeError, "init_threshold"),
        (dict(removal_window=0), ValueError, "removal_window"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TopAnyRouter(8, 4, **kwargs)


def test_empty_batch():
    router, _ = make(torch.float32)
    routing = router(torch.zeros(0, 8))
    assert routing.num_pairs == 0 and "diversity" in routing.losses


def test_layer_grows_and_shrinks():
    router = build_router("dynmoe", d_model=8, num_experts=4, k=2, init_threshold=0.2)
    assert isinstance(router, TopAnyRouter) and router.init_threshold == 0.2
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="dynmoe")
    x = torch.randn(2, 5, 8)
    out = layer(x)
    torch.testing.assert_close(out.output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
    assert "diversity" in out.losses and "fallback_share" in out.stats
    assert layer.add_expert() == 4
    assert layer.router.num_experts == layer.experts.num_experts == 5
    layer.remove_expert(0)
    assert layer.router.num_experts == layer.experts.num_experts == 4
    out = layer(x)
    assert out.output.shape == x.shape and out.stats["tokens_per_expert"].shape == (4,)
    layer.after_optimizer_step()
