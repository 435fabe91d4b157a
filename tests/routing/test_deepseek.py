"""DeepSeekRouter: vectorised vs the per-token loop and vs Hugging Face's DeepseekV3TopkRouter, gradients,
aux-loss-free bias balancing (between steps only), sequence-wise balance loss, argument checks."""

import math

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import pair_weights
from moekit.reference.routers_tokenchoice import reference_deepseek
from moekit.routing.deepseek import DeepSeekRouter
from moekit.routing.registry import build_router

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
# (num_experts, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
CONFIGS = [
    (8, 2, 1, 1, True, 1.0),
    (8, 3, 4, 2, True, 2.5),
    (12, 4, 3, 2, False, 2.5),
    (16, 4, 4, 1, True, 1.0),
]
SEQ_IDS = torch.tensor([4, 4, 4, 0, 0, 9, 9, 9, 9, 2, 2, 2])  # unsorted, non-contiguous sequence labels


def make(dtype, E=8, k=2, n_group=1, topk_group=1, norm=True, rsf=1.0, T=12, D=6, seed=0, **kw):
    torch.manual_seed(seed)
    router = DeepSeekRouter(
        D, E, k, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=rsf, **kw
    ).to(dtype)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(std=0.2)  # large enough to change some selections
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
    assert set(got.losses) == set(want.losses)
    for name, value in want.losses.items():
        torch.testing.assert_close(got.losses[name], value, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS + [(6, 2, 6, 3, True, 1.0)])  # last: groups of one expert
@pytest.mark.parametrize("seq_ids", [None, SEQ_IDS])
def test_matches_reference(dtype, config, seq_ids):
    E, k, G, TG, norm, rsf = config
    router, x = make(dtype, E, k, G, TG, norm, rsf, seq_aux_loss=True)
    got = router(x, seq_ids=seq_ids)
    assert_same_routing(got, reference_deepseek(router, x, seq_ids), dtype)
    assert got.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_match_reference(dtype, config):
    E, k, G, TG, norm, rsf = config
    router, x = make(dtype, E, k, G, TG, norm, rsf, seq_aux_loss=True)
    coef = torch.randn(x.shape[0], E, dtype=dtype)  # (T, E) weight of each pair in the loss
    params = [x, router.weight]

    def grads(routing):
        loss = (routing.weight * coef[routing.token_idx, routing.expert_idx]).sum()
        loss = loss + routing.losses["seq_balance"]
        return torch.autograd.grad(loss, params)

    got = grads(router(x, seq_ids=SEQ_IDS))
    want = grads(reference_deepseek(router, x, SEQ_IDS))
    for g, w in zip(got, want, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_transformers(config):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, k, G, TG, norm, rsf = config
    router, x = make(torch.float32, E, k, G, TG, norm, rsf, T=64)
    hf_config = transformers.DeepseekV3Config(
        hidden_size=6,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=G,
        topk_group=TG,
        norm_topk_prob=norm,
        routed_scaling_factor=rsf,
    )
    hf = DeepseekV3TopkRouter(hf_config)
    hf.load_state_dict(router.state_dict())  # strict: same names for the weight and the bias buffer
    with torch.no_grad():
        hf_logits, hf_weights, hf_idx = hf(x)
        routing = router(x)
    torch.testing.assert_close(routing.logits, hf_logits)
    want = {(t, int(e)): hf_weights[t, j] for t in range(64) for j, e in enumerate(hf_idx[t])}
    got = pair_weights(routing)
    assert set(got) == set(want)
    for pair, w in want.items():
        torch.testing.assert_close(got[pair], w, rtol=1e-6, atol=1e-7)
    # The bias did matter: without it some token picks other experts.
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
    assert set(pair_weights(router(x))) != set(got)


def test_bias_is_selection_only():
    """The bias picks experts but never enters the weights: weights are the unbiased chosen sigmoid scores."""
    router, x = make(torch.float64, E=8, k=3, norm=False)
    routing = router(x)
    s = torch.sigmoid(x @ router.weight.t())
    torch.testing.assert_close(routing.weight, s[routing.token_idx, routing.expert_idx])
    biased = s + router.e_score_correction_bias
    T = x.shape[0]
    for j in range(3):  # slot j holds each token's (j+1)-th best by *biased* score
        want = biased.topk(3, dim=-1).indices[:, j]
        assert routing.expert_idx[j * T : (j + 1) * T].tolist() == want.tolist()
    torch.testing.assert_close(routing.probs, s / s.sum(dim=-1, keepdim=True))


def test_forward_never_touches_the_bias():
    router, x = make(torch.float32)
    before = router.e_score_correction_bias.clone()
    router.train()
    routing = router(x)
    (routing.weight.sum() + routing.probs.sum()).backward()
    router.eval()
    router(x)
    assert torch.equal(router.e_score_correction_bias, before)
    assert "e_score_correction_bias" not in dict(router.named_parameters())
    assert "e_score_correction_bias" in router.state_dict()  # persistent, like DeepSeek-V3 checkpoints


def test_bias_update_rule():
    router = DeepSeekRouter(4, 4, 1, bias_update_speed=0.01)
    router.after_optimizer_step(torch.tensor([5, 1, 3, 3]))  # mean 3
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    router.after_optimizer_step(torch.tensor([0, 0, 0, 0]))  # nothing routed: no move
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        router.after_optimizer_step(torch.tensor([1, 2, 3]))


def test_bias_hook_moves_load_toward_uniform():
    """A gate with strong per-expert offsets overloads the first experts; simulated steps (no weight updates,
    only the hook) must shrink the imbalance a lot."""
    T, D, E = 256, 6, 8
    router = DeepSeekRouter(D, E, 2, bias_update_speed=0.02)
    with torch.no_grad():
        router.weight[:, 0] = torch.linspace(2.0, -2.0, E)  # feature 0 is constant 1: a per-expert offset
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1.0

    def imbalance():
        load = router(x).tokens_per_expert().double()
        return float(load.var(unbiased=False) / load.mean() ** 2), load

    start, load = imbalance()
    assert start > 0.5  # really skewed to begin with
    for _ in range(30):
        before = router.e_score_correction_bias.clone()
        load = router(x).tokens_per_expert()
        router.after_optimizer_step(load)
        step = router.e_score_correction_bias - before
        want = 0.02 * (load.double().mean() - load.double()).sign().float()
        torch.testing.assert_close(step, want, rtol=0, atol=1e-7)
    end, load = imbalance()
    assert end < 0.1 * start, (start, end, load)


def test_layer_hook_updates_bias():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="deepseek", router_options=dict(bias_update_speed=0.1))
    x = torch.randn(2, 6, 8)
    out = layer(x)
    out.output.sum().backward()
    load = layer.load_since_step.clone()
    assert torch.equal(layer.router.e_score_correction_bias, torch.zeros(4))
    layer.after_optimizer_step()
    want = 0.1 * (load.double().mean() - load.double()).sign().float()
    torch.testing.assert_close(layer.router.e_score_correction_bias, want)


def test_sequence_loss_by_hand():
    """E=2, k=1, W = I: token 0 = (1, 0) picks expert 0, token 1 = (0, 1) picks expert 1.

    One sequence: f = (1, 1), so the loss is P_0 + P_1 = 1. Two sequences: f = (2, 0) then (0, 2), so the
    loss is (2 s'_0(token 0) + 2 s'_1(token 1)) / 2 with s' the normalised sigmoid scores."""
    router = DeepSeekRouter(2, 2, 1, seq_aux_loss=True)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sig = 1 / (1 + math.exp(-1.0))
    s_own = sig / (sig + 0.5)  # s'(own expert) for either token: sigmoid(1) / (sigmoid(1) + sigmoid(0))
    one = router(x, seq_ids=torch.tensor([3, 3])).losses["seq_balance"].item()
    assert one == pytest.approx(1.0, rel=1e-6)
    assert router(x).losses["seq_balance"].item() == pytest.approx(one, rel=1e-12)  # None: one sequence
    two = router(x, seq_ids=torch.tensor([0, 1])).losses["seq_balance"].item()
    assert two == pytest.approx((2 * s_own + 2 * s_own) / 2, rel=1e-6)
    assert "seq_balance" not in DeepSeekRouter(2, 2, 1)(x).losses


def test_empty_batch():
    router, _ = make(torch.float32, seq_aux_loss=True)
    routing = router(torch.zeros(0, 6), seq_ids=torch.zeros(0, dtype=torch.long))
    assert routing.num_pairs == 0 and routing.logits.shape == (0, 8)
    assert routing.losses["seq_balance"].item() == 0.0


def test_autocast_keeps_float32():
    router, x = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x.detach().bfloat16())
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_experts=8, n_group=3), ValueError, "n_group"),
        (dict(n_group=2, topk_group=3), ValueError, "topk_group"),
        (dict(n_group=4, topk_group=1, k=3), ValueError, "k must be <="),  # 2 experts per kept group
        (dict(n_group=0), ValueError, "n_group"),
        (dict(topk_group=1.0), TypeError, "topk_group"),
        (dict(routed_scaling_factor=0.0), ValueError, "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor"),
        (dict(bias_update_speed=-1e-3), ValueError, "bias_update_speed"),
        (dict(norm_topk_prob=1), TypeError, "norm_topk_prob"),
        (dict(seq_aux_loss="yes"), TypeError, "seq_aux_loss"),
        (dict(k=9), ValueError, "k"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(d_model=6, num_experts=8, k=2) | kwargs
    with pytest.raises(exc, match=match):
        DeepSeekRouter(**args)


def test_bad_seq_ids():
    router, x = make(torch.float32, seq_aux_loss=True)
    with pytest.raises(ValueError, match="seq_ids"):
        router(x, seq_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="seq_ids"):
        router(x, seq_ids=torch.zeros(x.shape[0]))


def test_registry_and_layer():
    router = build_router("deepseek", d_model=8, num_experts=8, k=2, n_group=4, topk_group=2)
    assert isinstance(router, DeepSeekRouter) and (router.n_group, router.topk_group) == (4, 2)
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router="deepseek", router_options=dict(seq_aux_loss=True))
    x = torch.randn(2, 5, 8)
    out = layer(x)
    assert "seq_balance" in out.losses
    ref = reference_forward(layer, x)
    torch.testing.assert_close(out.output, ref.output, rtol=1e-5, atol=1e-5)
