"""Dispatch plans on a hand-made routing: which pairs survive capacity, grouping, counts, capacity formula."""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch import expert_capacity, plan_capacity, plan_dropless
from moekit.routing.base import Routing

pytestmark = pytest.mark.usefixtures("one_thread")

# T = 5 tokens, E = 3 experts, k = 2, slot-major pairs: p0..p4 are the first choices of tokens 0..4,
# p5..p9 their second choices.
EXPERTS = [0, 0, 1, 0, 2, 1, 2, 0, 2, 0]
WEIGHTS = [0.6, 0.55, 0.7, 0.9, 0.8, 0.4, 0.45, 0.3, 0.1, 0.95]
# Loads: expert 0 gets p0 p1 p3 p7 p9 (5), expert 1 p2 p5 (2), expert 2 p4 p6 p8 (3).


def make_routing(weights=WEIGHTS, priority=None, requires_grad=False):
    w = torch.tensor(weights, dtype=torch.float64, requires_grad=requires_grad)
    return Routing(
        token_idx=torch.arange(5).repeat(2),
        expert_idx=torch.tensor(EXPERTS),
        weight=w,
        num_tokens=5,
        num_experts=3,
        priority=None if priority is None else torch.tensor(priority),
    )


def check_grouping(plan, routing):
    """Kept pairs grouped by expert, and the gathered fields belong to those pairs."""
    experts = routing.expert_idx[plan.pair_order]
    assert (experts[1:] >= experts[:-1]).all()
    assert torch.equal(plan.token_idx, routing.token_idx[plan.pair_order])
    assert torch.equal(plan.weight, routing.weight[plan.pair_order])
    assert torch.equal(plan.counts, torch.bincount(experts, minlength=routing.num_experts))


def test_dropless_keeps_every_pair_in_pair_order():
    routing = make_routing()
    plan = plan_dropless(routing)
    check_grouping(plan, routing)
    assert plan.pair_order.tolist() == [0, 1, 3, 7, 9, 2, 5, 4, 6, 8]  # stable: pair order inside an expert
    assert plan.counts.tolist() == plan.routed.tolist() == [5, 2, 3]
    assert plan.dropped.tolist() == [0, 0, 0] and plan.capacity is None


def test_position_policy_keeps_the_earliest_pairs():
    routing = make_routing()
    plan = plan_capacity(routing, 0.5, "position")  # C = ceil(0.5 * 10 / 3) = 2
    check_grouping(plan, routing)
    assert plan.capacity == 2
    # expert 0 keeps p0 p1 (first choices of tokens 0 and 1), drops p3 p7 p9; expert 2 drops p8.
    assert sorted(plan.pair_order.tolist()) == [0, 1, 2, 4, 5, 6]
    assert plan.counts.tolist() == [2, 2, 2]
    assert plan.routed.tolist() == [5, 2, 3]
    assert plan.dropped.tolist() == [3, 0, 1]
    # token 3 lost both of its pairs (p3, p8): it gets no expert at all
    assert 3 not in plan.token_idx.tolist()


def test_probability_policy_keeps_the_most_probable_pairs():
    routing = make_routing()
    plan = plan_capacity(routing, 0.5, "probability")
    check_grouping(plan, routing)
    # expert 0: p9 (0.95) and p3 (0.9) beat p0 p1 p7; expert 2: p4 (0.8) and p6 (0.45) beat p8 (0.1).
    assert sorted(plan.pair_order.tolist()) == [2, 3, 4, 5, 6, 9]
    assert plan.dropped.tolist() == [3, 0, 1]


def test_probability_ties_fall_back_to_pair_order():
    routing = make_routing(weights=[0.5] * 10)
    by_prob = plan_capacity(routing, 0.5, "probability")
    by_pos = plan_capacity(routing, 0.5, "position")
    assert sorted(by_prob.pair_order.tolist()) == sorted(by_pos.pair_order.tolist()) == [0, 1, 2, 4, 5, 6]


def test_explicit_priority_overrides_the_weight():
    priority = [float(p) for p in range(10)]  # later pairs have higher priority
    routing = make_routing(priority=priority)
    plan = plan_capacity(routing, 0.5, "probability")
    assert sorted(plan.pair_order.tolist()) == [2, 5, 6, 7, 8, 9]  # expert 0: p9 p7; expert 2: p8 p6


def test_min_capacity_and_large_factor_drop_nothing():
    routing = make_routing()
    assert plan_capacity(routing, 0.1, "position", min_capacity=5).dropped.tolist() == [0, 0, 0]
    plan = plan_capacity(routing, 1.5, "position")  # C = 5 = the largest load
    assert plan.capacity == 5 and plan.dropped.tolist() == [0, 0, 0]
    assert plan_capacity(routing, 1.0, "position").dropped.tolist() == [1, 0, 0]  # C = 4


def test_weight_gradient_flows_to_kept_pairs_only():
    routing = make_routing(requires_grad=True)
    plan = plan_capacity(routing, 0.5, "position")
    plan.weight.sum().backward()
    assert routing.weight.grad.tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 0, 0]


def test_empty_routing():
    routing = Routing(
        token_idx=torch.empty(0, dtype=torch.long),
        expert_idx=torch.empty(0, dtype=torch.long),
        weight=torch.empty(0),
        num_tokens=0,
        num_experts=3,
    )
    for plan in (plan_dropless(routing), plan_capacity(routing, 1.0, "probability")):
        assert plan.pair_order.numel() == 0
        assert plan.counts.tolist() == plan.routed.tolist() == plan.dropped.tolist() == [0, 0, 0]


def test_bad_drop_policy():
    with pytest.raises(ValueError, match="drop_policy"):
        plan_capacity(make_routing(), 1.0, "random")


@pytest.mark.parametrize(
    "pairs,experts,factor,min_capacity,want",
    [
        (12, 3, 1.0, 0, 4),
        (12, 3, 0.5, 0, 2),
        (12, 3, 1.25, 0, 5),  # ceil(5.0)
        (10, 4, 1.0, 0, 3),  # ceil(2.5)
        (10, 4, 1.2, 0, 3),
        (100, 10, 1.1, 0, 11),  # 1.1 * 100 / 10 is 11.000000000000002 in floating point; the formula says 11
        (50, 5, 1.1, 0, 11),
        (100, 2, 1.1, 0, 55),  # 55.00000000000001
        (30, 10, 1.1, 0, 4),  # ceil(3.3)
        (10, 4, 0.01, 0, 1),
        (10, 4, 0.5, 7, 7),  # min_capacity wins
        (0, 4, 1.0, 0, 0),
        (0, 4, 1.0, 2, 2),
    ],
)
def test_capacity_formula(pairs, experts, factor, min_capacity, want):
    assert expert_capacity(pairs, experts, factor, min_capacity) == want


def test_capacity_formula_is_exact_for_decimal_factors():
    # ceil(m/100 * P / E) with integers only, for every two-decimal factor: no float rounding across a boundary.
    for m in range(1, 401):
        for pairs, experts in ((100, 10), (4096, 64), (30, 7), (8192, 8)):
            want = -(-m * pairs // (100 * experts))
            assert expert_capacity(pairs, experts, m / 100) == want, (m, pairs, experts)
    assert expert_capacity(10, 3, 2) == 7  # int factors work too
