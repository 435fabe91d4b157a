"""Per-sequence absolute expert capacity: Hugging Face SwitchTransformers' ``expert_capacity`` semantics.

transformers' ``SwitchTransformersTop1Router`` routes each sequence of a (B, L, D) batch on its own: a token
is kept when ``cumsum(one_hot(expert), dim=positions) <= expert_capacity``, i.e. per sequence and expert the
first ``expert_capacity`` tokens by position are computed, later ones get zero expert output. This holds in
training and in eval, and padding tokens count like any other.

moekit's ``plan_capacity`` is different on purpose: one capacity ``ceil(capacity_factor * pairs / E)`` for
the whole batch (GShard / Switch paper). This module adds the per-sequence plan and a ``MoELayer`` using it.
(A core hook such as ``MoELayer(planner=...)`` would make the subclass unnecessary; see docs/interop.md.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.dispatch.plan import DispatchPlan
from moekit.layer import MoELayer
from moekit.routing.base import Routing


@dataclass
class SequenceRouting(Routing):
    """A ``Routing`` that also knows the sequence of each token: ``seq_ids`` (T,) int64."""

    seq_ids: Tensor | None = None


def plan_sequence_capacity(routing: Routing, pair_seq: Tensor, capacity: int) -> DispatchPlan:
    """Keep, per (sequence, expert), the first ``capacity`` pairs in pair order; kept pairs grouped by expert.

    ``pair_seq`` (P,) int64 is the sequence of each pair. Inside an expert, kept pairs stay in pair order
    (sequence-major for top-1 slot-major pairs).
    """
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    E, P = routing.num_experts, routing.num_pairs
    if pair_seq.shape != (P,):
        raise ValueError(f"pair_seq must have shape ({P},), got {tuple(pair_seq.shape)}")
    group = pair_seq * E + routing.expert_idx  # (P,) one group per (sequence, expert)
    order = torch.argsort(group, stable=True)  # (P,) grouped, pair order inside a group
    sorted_group = group[order]
    first = torch.searchsorted(sorted_group, sorted_group)  # (P,) first sorted position of each pair's group
    rank = torch.arange(P, device=order.device) - first  # (P,) rank inside (sequence, expert)
    kept = order[rank < capacity]  # (S,) ordered by (sequence, expert, pair)
    kept = kept[torch.argsort(routing.expert_idx[kept], stable=True)]  # (S,) by expert, then sequence
    routed = routing.tokens_per_expert()  # (E,)
    counts = torch.bincount(routing.expert_idx[kept], minlength=E)  # (E,)
    return DispatchPlan(
        pair_order=kept,
        token_idx=routing.token_idx[kept],
        weight=routing.weight[kept],
        counts=counts,
        routed=routed,
        dropped=routed - counts,
        capacity=capacity,
    )


class SequenceCapacityMoELayer(MoELayer):
    """``MoELayer`` with an absolute per-sequence ``expert_capacity`` (in training and eval).

    Its router must return a ``SequenceRouting`` (``moekit.interop.routers.HFGateRouter`` with the ``switch``
    scheme does).
    """

    def __init__(self, *args, expert_capacity: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(expert_capacity, bool) or not isinstance(expert_capacity, int) or expert_capacity < 0:
            raise ValueError(f"expert_capacity must be an int >= 0, got {expert_capacity!r}")
        self.expert_capacity = expert_capacity

    def _plan(self, routing: Routing) -> DispatchPlan:
        if not isinstance(routing, SequenceRouting) or routing.seq_ids is None:
            raise TypeError("SequenceCapacityMoELayer needs a router that returns a SequenceRouting with seq_ids")
        return plan_sequence_capacity(routing, routing.seq_ids[routing.token_idx], self.expert_capacity)

    def extra_repr(self) -> str:
        return f"expert_capacity={self.expert_capacity} (per sequence)"
