"""NoisyTopKRouter: vectorised vs the per-token loop (same noise), gradients, the importance and load losses
against hand computations, noise only in training, reproducible generator, contract."""

import math

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights
from moekit.reference.routers_tokenchoice import reference_noisy_topk
from moekit.routing.noisy import NoisyTopKRouter
from moekit.routing.registry import build_router

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
SEED = 7


def make(dtype, T=10, D=6, E=5, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    router = NoisyTopKRouter(D, E, k, generator=torch.Generator().manual_seed(SEED), **kw).to(dtype)
    with torch.no_grad():
        router.noise_weight.normal_(std=0.5)  # zero at init; make the noise scale depend on the input
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return router, x


def same_noise(router, x):
    """The (T, E) N(0, 1) block the router draws from a generator seeded with SEED."""
    T, E = x.shape[0], router.num_experts
    return torch.randn(T, E, generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)


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
    for name in ("importance", "load"):
        torch.testing.assert_close(got.losses[name], want.losses[name], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(dtype, k, training):
    router, x = make(dtype, k=k)
    router.train(training)
    got = router(x)
    assert_same_routing(got, reference_noisy_topk(router, x, same_noise(router, x)), dtype)
    assert got.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_reference(dtype, training):
    router, x = make(dtype, k=2)
    router.train(training)
    coef = torch.randn(x.shape[0], router.num_experts, dtype=dtype)  # (T, E) weight of each pair in the loss
    params = [x, router.weight, router.noise_weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        return torch.autograd.grad(loss, params, allow_unused=True)

    got = grads(router(x))
    want = grads(reference_noisy_topk(router, x, same_noise(router, x)))
    for g, w, name in zip(got, want, ("x", "weight", "noise_weight"), strict=True):
        if name == "noise_weight" and not training:
            assert g is None and w is None  # no noise in eval: W_noise is not used
            continue
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_gradients_match_reference(dtype):
    """The smooth load estimator is differentiable w.r.t. both gate matrices."""
    router, x = make(dtype, k=2, T=12)
    params = [router.weight, router.noise_weight]
    for name in ("importance", "load"):
        router.generator = torch.Generator().manual_seed(SEED)  # the block same_noise() draws
        got = torch.autograd.grad(router(x).losses[name], params)
        want = torch.autograd.grad(reference_noisy_topk(router, x, same_noise(router, x)).losses[name], params)
        for g, w in zip(got, want, strict=True):  # both depend on W_noise through the noisy logits
            assert g.abs().sum() > 0
            torch.testing.assert_close(g, w, **TOL[dtype])


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _cv2(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / (mean**2 + 1e-10)


def test_losses_by_hand_training():
    """T=3, E=3, k=1, W_g = I (clean logits = x), W_noise = 0 (scale = softplus(0) + 0.01 = ln 2 + 0.01).

    With k = 1 the gate of the chosen expert is 1, so Importance is the count per expert; P(x, i) is the
    chance that x_i + noise beats the best *other* noisy logit (the paper's kth_excluding with k = 1)."""
    router = NoisyTopKRouter(3, 3, k=1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 0.2, -0.5], [0.0, 0.9, 0.8], [0.3, 0.1, 0.2]])
    eps = torch.randn(3, 3, generator=torch.Generator().manual_seed(3)).tolist()
    scale = math.log(2) + 0.01
    H = [[x[t, i].item() + eps[t][i] * scale for i in range(3)] for t in range(3)]
    chosen = [max(range(3), key=lambda i, t=t: H[t][i]) for t in range(3)]
    counts = [float(chosen.count(i)) for i in range(3)]
    load = [
        sum(_phi((x[t, i].item() - max(H[t][j] for j in range(3) if j != i)) / scale) for t in range(3))
        for i in range(3)
    ]
    routing = router(x)
    assert routing.expert_idx.tolist() == chosen
    assert routing.weight.tolist() == [1.0, 1.0, 1.0]
    assert routing.losses["importance"].item() == pytest.approx(_cv2(counts), rel=1e-6)
    assert routing.losses["load"].item() == pytest.approx(_cv2(load), rel=1e-5)


def test_losses_by_hand_eval():
    """Eval, k=2, no noise: W_g = I, so the gates are a softmax over each token's two largest entries; the
    load loss is the CV^2 of the hard counts."""
    router = NoisyTopKRouter(3, 3, k=2).eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    # Each token's two largest logits are one apart: gates (s, 1 - s) with s = sigmoid(1).
    x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 3.0], [1.5, 0.0, 0.5]])
    s = 1 / (1 + math.exp(-1.0))
    # token 0 -> (expert 0: s, expert 1: 1 - s); token 1 -> (2: s, 1: 1 - s); token 2 -> (0: s, 2: 1 - s)
    importance = [s + s, (1 - s) + (1 - s), s + (1 - s)]
    counts = [2.0, 2.0, 2.0]
    routing = router(x)
    assert routing.losses["importance"].item() == pytest.approx(_cv2(importance), rel=1e-6)
    assert routing.losses["load"].item() == pytest.approx(_cv2(counts), abs=1e-12)  # balanced: 0
    assert routing.losses["load"].requires_grad is False


def test_noise_only_in_training_and_reproducible():
    router, x = make(torch.float32)
    clean = x @ router.weight.t()
    router.eval()
    a, b = router(x), router(x)
    torch.testing.assert_close(a.logits, clean)
    assert torch.equal(a.logits, b.logits)
    router.train()
    c = router(x)
    assert not torch.allclose(c.logits, clean)
    router.generator = torch.Generator().manual_seed(SEED)
    d = router(x)
    assert torch.equal(c.logits, d.logits)
    assert not torch.equal(router(x).logits, d.logits)  # the generator moved on
    router.noise = False
    torch.testing.assert_close(router(x).logits, clean)


def test_all_experts_kept_gives_hard_load():
    router, x = make(torch.float32, k=5)
    routing = router(x)
    assert routing.losses["load"].item() == 0.0  # every expert gets every token
    assert routing.experts_per_token().tolist() == [5] * x.shape[0]


def test_empty_batch():
    router, _ = make(torch.float32)
    routing = router(torch.zeros(0, 6))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 5)
    assert routing.losses["importance"].item() == 0.0 and routing.losses["load"].item() == 0.0


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
        (dict(noise_epsilon=0.0), ValueError, "noise_epsilon"),
        (dict(noise_epsilon=float("inf")), ValueError, "noise_epsilon"),
        (dict(noise_epsilon="0.01"), TypeError, "noise_epsilon"),
        (dict(noise=1), TypeError, "noise"),
        (dict(generator=0), TypeError, "generator"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(d_model=6, num_experts=5, k=2) | kwargs
    with pytest.raises(exc, match=match):
        NoisyTopKRouter(**args)


def test_registry_and_layer():
    router = build_router("noisy_topk", d_model=8, num_experts=4, k=2, noise_epsilon=0.05)
    assert isinstance(router, NoisyTopKRouter) and router.noise_epsilon == 0.05
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="noisy_topk")
    x = torch.randn(2, 5, 8)
    out = layer(x)
    assert {"importance", "load"} <= set(out.losses)
    out.aux_loss.backward()
    assert layer.router.noise_weight.grad.abs().sum() > 0  # the smooth load loss reaches W_noise
    layer.eval()
    torch.testing.assert_close(layer(x).output, reference_forward(layer, x).output, rtol=1e-5, atol=1e-5)
