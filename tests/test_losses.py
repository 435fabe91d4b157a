"""Auxiliary losses against hand computation on tiny explicit tensors, and their weighting into aux_loss."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoELayer
from moekit.losses import DEFAULT_LOSS_WEIGHTS, cv_squared, importance_loss, load_balance_loss, z_loss

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ load balance
@pytest.mark.parametrize("E", [2, 4, 8])
def test_load_balance_is_one_when_balanced(E):
    probs = torch.full((2 * E, E), 1.0 / E, dtype=F64)
    load = torch.full((E,), 2)  # every expert gets two pairs
    assert float(load_balance_loss(probs, load)) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("E", [2, 4, 8])
def test_load_balance_is_E_when_collapsed(E):
    probs = torch.zeros(5, E, dtype=F64)
    probs[:, 0] = 1.0
    load = torch.zeros(E, dtype=torch.long)
    load[0] = 5
    assert float(load_balance_loss(probs, load)) == pytest.approx(E, abs=1e-15)


def test_load_balance_by_hand_and_gradient():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], dtype=F64, requires_grad=True)
    load = torch.tensor([2, 1])
    # f = (2/3, 1/3), mean probs = (0.6, 0.4): 2 * (2/3 * 0.6 + 1/3 * 0.4) = 16/15
    loss = load_balance_loss(probs, load)
    assert float(loss.detach()) == pytest.approx(16 / 15, abs=1e-15)
    loss.backward()
    # d/dp[t, i] = E * f_i / T
    want = torch.tensor([[2 * (2 / 3) / 3, 2 * (1 / 3) / 3]], dtype=F64).expand(3, 2)
    torch.testing.assert_close(probs.grad, want, rtol=1e-15, atol=1e-15)


def test_load_balance_does_not_grow_with_k():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=F64)
    top1, top2 = torch.tensor([1, 0, 1]), torch.tensor([2, 0, 2])  # same shares, twice the pairs
    assert float(load_balance_loss(probs, top1)) == pytest.approx(float(load_balance_loss(probs, top2)))


def test_load_balance_empty():
    assert float(load_balance_loss(torch.empty(0, 4), torch.zeros(4, dtype=torch.long))) == 0


# ------------------------------------------------------------------------------------------ z-loss
def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=F64, requires_grad=True)
    # logsumexp rows: log 2 and log 4 = 2 log 2 -> mean of squares = (1 + 4) / 2 * log(2)^2
    loss = z_loss(logits)
    assert float(loss.detach()) == pytest.approx(2.5 * math.log(2.0) ** 2, abs=1e-15)
    loss.backward()
    # d/dlogits[t] = 2 * lse_t * softmax(logits[t]) / T
    lse = torch.tensor([math.log(2.0), math.log(4.0)], dtype=F64)
    want = 2 * lse.unsqueeze(1) * torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=F64) / 2
    torch.testing.assert_close(logits.grad, want, rtol=1e-14, atol=1e-15)


def test_z_loss_large_logits_stay_finite():
    loss = z_loss(torch.tensor([[1000.0, 1000.0]]))
    assert float(loss.detach()) == pytest.approx((1000 + math.log(2.0)) ** 2, rel=1e-6)


def test_z_loss_empty():
    assert float(z_loss(torch.empty(0, 3))) == 0


# ------------------------------------------------------------------------------------------ CV^2, importance
def test_cv_squared_by_hand():
    got = cv_squared(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    # mean 2, population variance 2/3 -> (2/3) / (4 + eps), eps = 1e-10
    assert got.dtype == F64  # float64 in, float64 out (router losses in float64 verification runs)
    assert float(got) == pytest.approx((2 / 3) / (4 + 1e-10), rel=1e-14)


def test_cv_squared_of_counts():
    assert float(cv_squared(torch.tensor([4, 4, 4, 4]))) == 0
    # collapsed: mean 2, variance (36 + 3 * 4) / 4 = 12 -> 12 / 4 = 3 = E - 1
    got = cv_squared(torch.tensor([8, 0, 0, 0]))
    assert got.dtype == torch.float32 and float(got) == pytest.approx(3.0)
    assert float(cv_squared(torch.tensor([7]))) == 0
    assert float(cv_squared(torch.zeros(4))) == 0  # eps: no division by zero
    assert cv_squared(torch.tensor([1.0, 3.0], dtype=torch.bfloat16)).dtype == torch.float32


def test_importance_loss_by_hand():
    gates = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.2, 0.8, 0.0]], dtype=F64, requires_grad=True)
    # per-expert sums (0.7, 1.8, 0.5): mean 1, variance (0.09 + 0.64 + 0.25) / 3, over 1 + eps
    loss = importance_loss(gates)
    assert float(loss.detach()) == pytest.approx((0.98 / 3) / (1 + 1e-10), rel=1e-14)
    loss.backward()
    # d cv2 / d s_e = 2 (s_e - m) / (E m^2) - 2 var / (E m^3) with m = 1, the same for every token's row
    s = torch.tensor([0.7, 1.8, 0.5], dtype=F64)
    want = (2 * (s - 1) / 3 - 2 * (0.98 / 3) / 3).expand(3, 3)
    torch.testing.assert_close(gates.grad, want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ weighting
def test_aux_loss_is_the_weighted_sum():
    torch.default_generator.manual_seed(0)
    x = torch.randn(9, 8, dtype=F64)
    layer = MoELayer(8, 8, 4, k=2, loss_weights={"z_loss": 2.0, "load_balance": 0.5}).double()
    out = layer(x)
    assert out.aux_loss.dtype == F64
    want = 2.0 * out.losses["z_loss"] + 0.5 * out.losses["load_balance"]
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-15, atol=0)
    only_z = MoELayer(8, 8, 4, k=2, loss_weights={"z_loss": 1.0}).double()  # unlisted losses weigh 0
    with torch.no_grad():
        only_z.load_state_dict(layer.state_dict())
    torch.testing.assert_close(only_z(x).aux_loss, out.losses["z_loss"], rtol=1e-15, atol=0)


def test_default_weights_and_float32_aux():
    torch.default_generator.manual_seed(0)
    layer = MoELayer(8, 8, 4, k=2)
    out = layer(torch.randn(6, 8))
    assert out.aux_loss.dtype == torch.float32
    want = sum(DEFAULT_LOSS_WEIGHTS[n] * v for n, v in out.losses.items())
    torch.testing.assert_close(out.aux_loss, want, rtol=1e-6, atol=0)


def test_layer_load_balance_counts_pairs_before_drops():
    torch.default_generator.manual_seed(0)
    layer = MoELayer(8, 8, 4, k=2, capacity_factor=0.5).double()
    x = torch.randn(10, 8, dtype=F64)
    out = layer(x)
    assert int(out.stats["dropped_per_expert"].sum()) > 0
    routing = layer.router(x)
    want = load_balance_loss(routing.probs, routing.tokens_per_expert())
    torch.testing.assert_close(out.losses["load_balance"], want, rtol=1e-15, atol=0)
    torch.testing.assert_close(out.losses["z_loss"], z_loss(routing.logits), rtol=1e-15, atol=0)
