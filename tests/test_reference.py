"""The per-token reference loop itself, against hand computation: it is the yardstick of every fast path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import MoELayer, Router, Routing, TopKRouter
from moekit.reference import kept_pairs, reference_forward

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
# Same hand-made routing as tests/dispatch: T = 5, E = 3, k = 2, slot-major.
EXPERTS = [0, 0, 1, 0, 2, 1, 2, 0, 2, 0]
WEIGHTS = [0.6, 0.55, 0.7, 0.9, 0.8, 0.4, 0.45, 0.3, 0.1, 0.95]


class FixedRouter(Router):
    """Routes token t to EXPERTS[t] (slot 0) and EXPERTS[T + t] (slot 1) with WEIGHTS; logits from a gate."""

    def __init__(self):
        super().__init__()
        self.num_experts = 3
        self.gate = nn.Parameter(torch.randn(3, 8, dtype=F64))

    def route(self, x, *, token_ids=None, seq_ids=None):
        T = x.shape[0]
        assert T == 5
        logits = x @ self.gate.t()
        return Routing(
            token_idx=torch.arange(T).repeat(2),
            expert_idx=torch.tensor(EXPERTS),
            weight=torch.tensor(WEIGHTS, dtype=F64),
            num_tokens=T,
            num_experts=3,
            logits=logits,
            probs=logits.softmax(-1),
        )


def fixed_routing():
    return FixedRouter().route(torch.randn(5, 8, dtype=F64))


def test_kept_pairs_by_hand():
    routing = fixed_routing()
    assert kept_pairs(routing, None, "position") == list(range(10))
    assert kept_pairs(routing, 2, "position") == [0, 1, 2, 4, 5, 6]
    assert kept_pairs(routing, 2, "probability") == [2, 3, 4, 5, 6, 9]
    assert kept_pairs(routing, 1, "position") == [0, 2, 4]
    assert kept_pairs(routing, 5, "position") == list(range(10))


def hand_expert(layer, e, x):
    w, F_ = layer.experts.gate_up_proj[e], layer.experts.d_ff
    return (F.silu(x @ w[:F_].t()) * (x @ w[F_:].t())) @ layer.experts.down_proj[e].t()


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("shared", [False, True])
def test_reference_forward_by_hand(capacity_factor, shared):
    torch.default_generator.manual_seed(0)
    layer = MoELayer(
        8, 6, 3, k=2, router=FixedRouter(), capacity_factor=capacity_factor, num_shared_experts=int(shared)
    ).double()
    x = torch.randn(2, 4, 8, dtype=F64)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])  # 5 real tokens
    out = reference_forward(layer, x, mask)
    x_real = x[mask]
    kept = range(10) if capacity_factor is None else [0, 1, 2, 4, 5, 6]  # C = ceil(0.5 * 10 / 3) = 2
    want = torch.zeros(5, 8, dtype=F64)
    for p in kept:
        t = p % 5
        want[t] += WEIGHTS[p] * hand_expert(layer, EXPERTS[p], x_real[t])
    if shared:
        s = layer.shared
        h = F.silu(x_real @ s.gate_proj.weight.t()) * (x_real @ s.up_proj.weight.t())
        want += h @ s.down_proj.weight.t()
    torch.testing.assert_close(out.output[mask], want, rtol=1e-12, atol=1e-12)
    assert (out.output[~mask] == 0).all()
    assert out.stats["tokens_per_expert"].tolist() == [5, 2, 3]
    assert out.stats["dropped_per_expert"].tolist() == ([0, 0, 0] if capacity_factor is None else [3, 0, 1])
    assert out.stats["num_tokens"] == 5
    logits = x_real @ layer.router.gate.t()
    p_mean = logits.softmax(-1).mean(0)
    lb = 3 * (5 / 10 * p_mean[0] + 2 / 10 * p_mean[1] + 3 / 10 * p_mean[2])
    torch.testing.assert_close(out.losses["load_balance"], lb, rtol=1e-12, atol=1e-12)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 5
    assert float(out.losses["z_loss"].detach()) == pytest.approx(z, rel=1e-12)
    # and the fast layer agrees with the yardstick on this routing too
    torch.testing.assert_close(layer(x, mask).output, out.output, rtol=1e-12, atol=1e-12)


class SeqRecorder(TopKRouter):
    def route(self, x, *, token_ids=None, seq_ids=None):
        self.seen = seq_ids.tolist()
        return super().route(x, token_ids=token_ids, seq_ids=seq_ids)


@pytest.mark.parametrize(
    "shape,mask_flat,want",
    [
        ((5,), [1, 1, 0, 1, 1], [0, 0, 0, 0]),  # (T, D): one sequence
        ((2, 3), [1, 0, 1, 1, 1, 0], [0, 0, 1, 1]),  # (B, L, D): rows are sequences
        ((2, 2, 2), [1, 1, 0, 1, 1, 0, 1, 1], [0, 0, 1, 2, 3, 3]),  # (A, B, L, D): A*B sequences of L
    ],
)
def test_sequence_ids_of_real_tokens(shape, mask_flat, want):
    """Layer and reference tell the router which sequence each real token came from (sequence-wise losses)."""
    torch.default_generator.manual_seed(0)
    layer = MoELayer(8, 4, 4, k=2, router=SeqRecorder(8, 4, 2)).double()
    x = torch.randn(*shape, 8, dtype=F64)
    mask = torch.tensor(mask_flat, dtype=torch.bool).reshape(shape)
    layer(x, mask)
    assert layer.router.seen == want
    reference_forward(layer, x, mask)
    assert layer.router.seen == want
    layer(x)
    seq_len = shape[-1] if len(shape) > 1 else 5  # (T, D) is one sequence of T = 5
    assert layer.router.seen == (torch.arange(math.prod(shape)) // seq_len).tolist()
