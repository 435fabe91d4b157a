"""MoELayer against the per-token reference loop, for every registered router, dispatch backend and drop mode.

Gradients are those of ``(output * g).sum() + sum(losses) + aux_loss`` w.r.t. the input, the router and the
experts (see ``conftest.run_both``); float64 is held to 1e-10, float32 to 1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moekit import MoELayer, TopKRouter, available_routers
from moekit.experts import FFNExpert, GRUExpert

ROUTERS = available_routers()
BACKENDS = ["grouped_mm", "bmm", "loop", "auto"]
MODES = {
    "dropless": dict(capacity_factor=None),
    "cap-position": dict(capacity_factor=0.5, drop_policy="position"),
    "cap-probability": dict(capacity_factor=0.5, drop_policy="probability"),
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])

pytestmark = pytest.mark.usefixtures("one_thread")


def check_drops(out, layer, mode):
    """Dropless drops nothing; capacity 0.5 with at least 2E pairs must overflow some expert (pigeonhole)."""
    dropped = int(out.stats["dropped_per_expert"].sum())
    if MODES[mode]["capacity_factor"] is None:
        assert dropped == 0
    else:
        assert int(out.stats["tokens_per_expert"].sum()) >= 2 * layer.num_experts
        assert dropped > 0


# ------------------------------------------------------------------------------------------ the matrix
@DTYPES
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ROUTERS)
def test_matches_reference(make_layer, batch, check_reference, router, backend, mode, dtype):
    """Padded (3, 5, D) batch with 11 real tokens (not divisible by E = 4), training mode."""
    layer = make_layer(router, dtype=dtype, backend=backend, **MODES[mode])
    x, mask, ids = batch(dtype)
    out, _, _ = check_reference(layer, x, mask, ids)
    check_drops(out, layer, mode)
    assert out.stats["num_tokens"] == int(mask.sum())
    assert (out.output[~mask] == 0).all()
    assert layer.load_since_step.tolist() == out.stats["tokens_per_expert"].tolist()  # training: accumulated


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("router", ROUTERS)
def test_matches_reference_eval(make_layer, batch, check_reference, router, mode):
    """Eval mode: random routers are deterministic here, batch-level routers switch to their eval rule."""
    layer = make_layer(router, **MODES[mode]).eval()
    x, mask, ids = batch()
    out, _, _ = check_reference(layer, x, mask, ids)
    check_drops(out, layer, mode)
    assert not layer.load_since_step.any()  # no load accumulated in eval


@pytest.mark.parametrize("mode", ["dropless", "cap-probability"])
@pytest.mark.parametrize("router", ["noisy_topk", "gshard"])
def test_random_routers_with_seeded_generator(make_layer, batch, check_reference, router, mode):
    """Training-time noise drawn from the router's own seeded generator (copied with the layer's twin)."""
    gen = torch.Generator().manual_seed(3)
    layer = make_layer(router, router_options={"generator": gen}, **MODES[mode])
    x, mask, ids = batch()
    out, _, _ = check_reference(layer, x, mask, ids)
    check_drops(out, layer, mode)
    assert layer.router.generator is gen
    assert not torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())  # noise was drawn


@pytest.mark.parametrize("shape", [(11,), (3, 4), (2, 2, 3)], ids=["T", "B-L", "A-B-L"])
@pytest.mark.parametrize("router", ROUTERS)
def test_leading_shapes(make_layer, batch, check_reference, both, router, shape):
    layer = make_layer(router, capacity_factor=1.0)
    x, mask, ids = batch(shape=shape)
    check_reference(layer, x, None, ids)
    out, _, _ = check_reference(layer, x, mask, ids)
    if len(shape) == 3:  # (A, B, L) is A*B sequences of length L, exactly like (A*B, L)
        L = shape[-1]
        flat, _, _, _ = both(layer, x.reshape(-1, L, 8), mask.reshape(-1, L), ids.reshape(-1, L))
        torch.testing.assert_close(out.output, flat.output.reshape(x.shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
def test_activations(make_layer, batch, check_reference, activation):
    layer = make_layer("topk", activation=activation, backend="bmm")
    x, mask, ids = batch()
    check_reference(layer, x, mask, ids)


# ------------------------------------------------------------------------------------------ edge cases
@DTYPES
@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["topk", "mixtral", "qwen"])
def test_k_equals_num_experts(make_layer, batch, check_reference, router, backend, cf, dtype):
    layer = make_layer(router, k=4, backend=backend, capacity_factor=cf, dtype=dtype)
    x, mask, ids = batch(dtype)
    out, _, _ = check_reference(layer, x, mask, ids)
    T = int(mask.sum())
    assert out.stats["tokens_per_expert"].tolist() == [T] * 4
    if cf is None:
        assert out.stats["experts_per_token"] == 4
    else:  # C = ceil(0.5 * 4T / 4) = ceil(T / 2) per expert
        assert out.stats["dropped_per_expert"].tolist() == [T - math.ceil(T / 2)] * 4


@DTYPES
@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_tokens(make_layer, batch, check_reference, backend, cf, dtype):
    """The first and the last expert get no token (empty groups at both ends of the grouped GEMM)."""
    bias = {"bias": True}
    layer = make_layer("topk", backend=backend, capacity_factor=cf, router_options=bias, dtype=dtype)
    with torch.no_grad():
        layer.router.bias[[0, 3]] = -1e3  # never in anyone's top 2
    x, mask, ids = batch(dtype)
    out, _, grads = check_reference(layer, x, mask, ids)
    T = int(mask.sum())
    assert out.stats["tokens_per_expert"].tolist() == [0, T, T, 0]
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        per_expert = grads[name].abs().flatten(1).sum(1)
        assert per_expert[[0, 3]].tolist() == [0.0, 0.0]
        assert (per_expert[[1, 2]] > 0).all()


@DTYPES
@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("gate", [False, True], ids=["no-gate", "sigmoid-gate"])
def test_shared_experts(make_layer, batch, check_reference, gate, cf, dtype):
    opts = dict(num_shared_experts=2, shared_d_ff=4, shared_gate=gate)
    layer = make_layer("topk", capacity_factor=cf, dtype=dtype, **opts)
    x, mask, ids = batch(dtype)
    out, _, grads = check_reference(layer, x, mask, ids)
    assert grads["shared.up_proj.weight"].abs().sum() > 0
    if gate:
        assert grads["shared.shared_expert_gate.weight"].abs().sum() > 0
    # The shared part is exactly SharedExperts on the real tokens, added to the routed part; pads stay zero.
    routed_only = copy.deepcopy(layer)
    routed_only.shared = None
    with torch.no_grad():
        routed = routed_only(x, mask).output
        shared = layer.shared(x[mask])
    torch.testing.assert_close(out.output[mask], routed[mask] + shared, **TOL[dtype])
    assert (out.output[~mask] == 0).all()


@DTYPES
@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("k", [1, 2])
def test_heterogeneous_experts(batch, check_reference, k, cf, dtype):
    torch.default_generator.manual_seed(0)
    experts = [GRUExpert(8, steps=2, hidden=6), FFNExpert(8, 8)]
    layer = MoELayer(8, None, 2, k=k, experts=experts, capacity_factor=cf).to(dtype)
    x, mask, ids = batch(dtype)
    out, _, grads = check_reference(layer, x, mask, ids)
    assert (out.stats["tokens_per_expert"] > 0).all()  # both kinds of expert are exercised
    assert grads["experts.experts.0.gru.weight_hh_l0"].abs().sum() > 0
    assert grads["experts.experts.1.down_proj.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------------ masks and stats
def _masked_vs_real(layer, x, mask, ids):
    """(masked run on the padded batch, run on the real tokens only), same RNG state and router state."""
    twin = copy.deepcopy(layer)
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x[mask].detach().clone().requires_grad_(True)
    torch.default_generator.manual_seed(0)
    out = layer(x1, mask, token_ids=ids)
    torch.default_generator.manual_seed(0)
    real = twin(x2, token_ids=ids[mask])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    (gx1,) = torch.autograd.grad((out.output * g).sum() + out.aux_loss, [x1])
    (gx2,) = torch.autograd.grad((real.output * g[mask]).sum() + real.aux_loss, [x2])
    return out, real, gx1, gx2


@pytest.mark.parametrize("cf", [None, 0.5])
@pytest.mark.parametrize("router", ROUTERS)
def test_masked_tokens_are_ignored(make_layer, batch, router, cf):
    """Pads get zero output and zero gradient and change nothing: not the load, the losses, the capacity."""
    layer = make_layer(router, capacity_factor=cf)
    x, mask, ids = batch(shape=(1, 15))  # one sequence, like the (T, D) run on the real tokens
    x[~mask] = 1e3  # pads hold garbage: it must not leak anywhere
    out, real, gx, gx_real = _masked_vs_real(layer, x, mask, ids)
    assert (out.output[~mask] == 0).all() and (gx[~mask] == 0).all()
    torch.testing.assert_close(out.output[mask], real.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx[mask], gx_real, rtol=1e-12, atol=1e-12)
    for key in ("tokens_per_expert", "dropped_per_expert", "num_tokens"):
        assert out.stats[key].tolist() == real.stats[key].tolist(), key
    assert out.losses.keys() == real.losses.keys()
    for name, value in real.losses.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-12, atol=1e-12)
    if real.router_logits is not None:
        assert out.router_logits.shape == (int(mask.sum()), layer.num_experts)


def test_all_tokens_masked(make_layer, batch):
    layer = make_layer("topk", num_shared_experts=1)
    x, _, _ = batch()
    x.requires_grad_(True)
    out = layer(x, torch.zeros(3, 5, dtype=torch.bool))
    assert out.output.shape == x.shape and (out.output == 0).all()
    assert out.stats["tokens_per_expert"].tolist() == [0, 0, 0, 0] and out.stats["num_tokens"] == 0
    assert all(float(v) == 0 for v in out.losses.values())
    (out.output.sum() + out.aux_loss).backward()
    assert (x.grad == 0).all()


def test_stats_match_hand_count(make_layer, batch):
    """Capacity 0.5, k = 1: per-expert load and drops, dropped and zero-expert shares, experts per token."""
    layer = make_layer("topk", k=1, capacity_factor=0.5)
    x, mask, _ = batch()
    out = layer(x, mask)
    routing = layer.router(x[mask])  # the same routing the layer saw (deterministic router)
    T, E, P = routing.num_tokens, 4, routing.num_pairs
    C = math.ceil(0.5 * P / E)
    load, dropped, kept_per_token = [0] * E, [0] * E, [0] * T
    for t, e in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), strict=True):
        load[e] += 1
        if load[e] <= C:
            kept_per_token[t] += 1
        else:
            dropped[e] += 1
    assert out.stats["tokens_per_expert"].shape == (E,)
    assert out.stats["tokens_per_expert"].tolist() == load
    assert out.stats["dropped_per_expert"].tolist() == dropped
    assert out.stats["num_tokens"] == T == 11
    assert sum(dropped) > 0 and 0 in kept_per_token
    assert float(out.stats["dropped_share"]) == pytest.approx(sum(dropped) / P)
    assert float(out.stats["zero_expert_share"]) == pytest.approx(kept_per_token.count(0) / T)
    assert float(out.stats["experts_per_token"]) == pytest.approx(sum(kept_per_token) / T)
    mean = sum(load) / E
    cv = math.sqrt(sum((v - mean) ** 2 for v in load) / E) / mean
    assert float(out.stats["load_cv"]) == pytest.approx(cv, rel=1e-5)
    p = routing.probs.detach()
    assert float(out.stats["router_entropy"]) == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-9)


def test_stats_dropless_top2(make_layer, batch):
    layer = make_layer("topk", k=2)
    x, mask, _ = batch()
    out = layer(x, mask)
    T = int(mask.sum())
    assert int(out.stats["tokens_per_expert"].sum()) == 2 * T
    assert out.stats["dropped_per_expert"].tolist() == [0, 0, 0, 0]
    assert float(out.stats["dropped_share"]) == 0 and float(out.stats["zero_expert_share"]) == 0
    assert float(out.stats["experts_per_token"]) == 2


def test_capacity_and_eval_capacity(make_layer, batch):
    """Training uses capacity_factor, eval uses eval_capacity_factor; min_capacity bounds C from below."""
    x, mask, _ = batch()
    T = int(mask.sum())
    layer = make_layer("topk", k=2, capacity_factor=0.5, eval_capacity_factor=2.0)
    assert int(layer(x, mask).stats["dropped_per_expert"].sum()) > 0
    out = layer.eval()(x, mask)  # C = ceil(2 * 2T / 4) = T: nothing can overflow with k = 2 distinct experts
    assert int(out.stats["dropped_per_expert"].sum()) == 0
    big = make_layer("topk", k=2, capacity_factor=0.01, min_capacity=T)
    assert int(big(x, mask).stats["dropped_per_expert"].sum()) == 0
    tiny = make_layer("topk", k=2, capacity_factor=0.01)  # C = max(ceil(0.01 * 22 / 4), 0) = 1
    stats = tiny(x, mask).stats
    kept = stats["tokens_per_expert"] - stats["dropped_per_expert"]
    assert kept.tolist() == stats["tokens_per_expert"].clamp(max=1).tolist()


# ------------------------------------------------------------------------------------------ between steps
class SpyRouter(TopKRouter):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen: list[torch.Tensor] = []

    def after_optimizer_step(self, tokens_per_expert):
        self.seen.append(tokens_per_expert.clone())


def test_after_optimizer_step_passes_and_resets_load(batch):
    torch.default_generator.manual_seed(0)
    spy = SpyRouter(8, 4, k=2)
    layer = MoELayer(8, 8, 4, k=2, router=spy, capacity_factor=0.5).double()
    x, mask, _ = batch()
    first = layer(x, mask).stats["tokens_per_expert"]
    second = layer(x[:2]).stats["tokens_per_expert"]
    layer.after_optimizer_step()
    assert len(spy.seen) == 1
    assert spy.seen[0].tolist() == (first + second).tolist()
    assert int(spy.seen[0].sum()) == 2 * (int(mask.sum()) + 10)  # routed pairs, drops included
    assert layer.load_since_step.tolist() == [0, 0, 0, 0]
    layer.after_optimizer_step()  # nothing since the last step
    assert spy.seen[1].tolist() == [0, 0, 0, 0]
    layer.eval()
    layer(x, mask)
    assert layer.load_since_step.tolist() == [0, 0, 0, 0]
    layer.after_optimizer_step()
    assert spy.seen[2].tolist() == [0, 0, 0, 0]


def test_dynmoe_add_and_remove_expert(make_layer, batch, check_reference):
    layer = make_layer("dynmoe")
    old_in, old_down = layer.experts.in_proj.detach().clone(), layer.experts.down_proj.detach().clone()
    x, mask, ids = batch()
    layer(x, mask)
    assert layer.add_expert(init_from=1) == 4
    assert layer.num_experts == 5 and layer.load_since_step.shape == (5,)
    assert torch.equal(layer.experts.in_proj[:4], old_in) and torch.equal(layer.experts.in_proj[4], old_in[1])
    assert torch.equal(layer.experts.down_proj[:4], old_down)
    check_reference(layer, x, mask, ids)
    layer(x, mask)
    layer.after_optimizer_step()  # the router checks the load has the new shape (5,)
    layer.remove_expert(0)
    assert layer.num_experts == 4 and layer.router.num_experts == 4
    assert torch.equal(layer.experts.in_proj, torch.cat([old_in[1:], old_in[1:2]]))
    check_reference(layer, x, mask, ids)


# ------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("router", ROUTERS)
def test_same_seed_same_output(make_layer, batch, router):
    x, mask, ids = batch()
    outs = []
    for seed in (5, 5, 6):
        layer = make_layer(router, seed=seed, capacity_factor=1.0)
        torch.default_generator.manual_seed(0)
        outs.append(layer(x, mask, token_ids=ids).output)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
