"""Dispatch plans: which pairs are computed, grouped by expert, and which are dropped.

``plan_dropless`` keeps every pair. ``plan_capacity`` keeps at most C pairs per expert,
C = max(ceil(capacity_factor * P / E), min_capacity) with P pairs, and drops the rest:

- ``drop_policy="position"``: earlier pairs win (pairs are slot-major, so first choices beat second choices and
  earlier tokens beat later ones; GShard / Switch).
- ``drop_policy="probability"``: pairs with the highest router priority win (batch priority routing, V-MoE).

Dropped pairs contribute nothing to the output; a token all of whose pairs are dropped gets zero MoE output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.routing.base import Routing, ceil_scaled

DROP_POLICIES = ("position", "probability")


@dataclass
class DispatchPlan:
    """Kept pairs sorted by expert. ``S`` kept pairs, ``E`` experts."""

    pair_order: Tensor  # (S,) indices into the Routing's pairs, grouped by expert
    token_idx: Tensor  # (S,) token of each kept pair
    weight: Tensor  # (S,) combine weight of each kept pair (differentiable)
    counts: Tensor  # (E,) kept pairs per expert
    routed: Tensor  # (E,) pairs the router asked for, per expert
    dropped: Tensor  # (E,) pairs dropped for capacity, per expert
    capacity: int | None  # per-expert capacity, None when dropless


def plan_dropless(routing: Routing) -> DispatchPlan:
    """Keep every pair; group by expert with a stable sort (pair order is kept inside an expert)."""
    routed = routing.tokens_per_expert()
    order = torch.argsort(routing.expert_idx, stable=True)  # (P,)
    return DispatchPlan(
        pair_order=order,
        token_idx=routing.token_idx[order],
        weight=routing.weight[order],
        counts=routed,
        routed=routed,
        dropped=torch.zeros_like(routed),
        capacity=None,
    )


def expert_capacity(num_pairs: int, num_experts: int, capacity_factor: float, min_capacity: int = 0) -> int:
    """Pairs one expert may take: ``max(ceil(capacity_factor * P / E), min_capacity)``, computed exactly."""
    return max(ceil_scaled(capacity_factor, num_pairs, num_experts), min_capacity)


def plan_capacity(
    routing: Routing, capacity_factor: float, drop_policy: str = "position", min_capacity: int = 0
) -> DispatchPlan:
    """Keep at most C pairs per expert (see module doc for C and the drop policies)."""
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    E, P = routing.num_experts, routing.num_pairs
    C = expert_capacity(P, E, capacity_factor, min_capacity)
    if drop_policy == "probability":
        by_priority = torch.argsort(routing.pair_priority(), descending=True, stable=True)  # (P,)
        order = by_priority[torch.argsort(routing.expert_idx[by_priority], stable=True)]
    else:
        order = torch.argsort(routing.expert_idx, stable=True)
    routed = routing.tokens_per_expert()  # (E,)
    starts = routed.cumsum(0) - routed  # (E,) first sorted position of each expert
    rank = torch.arange(P, device=order.device) - starts[routing.expert_idx[order]]  # (P,) rank inside expert
    keep = rank < C
    kept_order = order[keep]
    counts = routed.clamp(max=C)
    return DispatchPlan(
        pair_order=kept_order,
        token_idx=routing.token_idx[kept_order],
        weight=routing.weight[kept_order],
        counts=counts,
        routed=routed,
        dropped=routed - counts,
        capacity=C,
    )
