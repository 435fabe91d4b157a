"""BASE layers routing (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models").

In training, tokens are assigned to experts by a *balanced linear assignment* that maximises the total
token-expert affinity ``x W^T``: every expert gets the same number of tokens, so no balance loss and no
drops are needed. The assignment is solved exactly with ``scipy.optimize.linear_sum_assignment``
(Hungarian-type, on the CPU) on a cost matrix in which each expert's column is repeated once per slot. The
combine weight is ``sigmoid(affinity)`` of the assigned expert, which is what trains the gate. In eval each
token takes its top-1 expert by affinity (the balanced assignment looks at the whole batch, which inference
cannot do).

Balance: with ``capacity=None`` each expert gets ``floor(T/E)`` or ``ceil(T/E)`` tokens. Each expert has
``floor(T/E)`` mandatory slots and one optional slot; ``E - T mod E`` dummy rows, which may only fill
optional slots, make the matrix square so that exactly ``T mod E`` experts get the extra token. With an
explicit ``capacity`` each expert takes at most ``capacity`` tokens (no lower bound).

Cost: the solver is O(n^3) in n ~ T on the CPU (about 2 s for T = 4096). Batches whose cost matrix exceeds
``max_cost_entries`` (default 2**24, i.e. T ~ 4096) raise a ValueError; route micro-batches or raise the
limit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, empty_routing, fp32_logits
from moekit.routing.topk import check_router_sizes

MAX_COST_ENTRIES = 2**24


def balanced_assignment(affinity: np.ndarray, capacity: int | None = None) -> np.ndarray:
    """(T,) expert of each token maximising the summed affinity under the balance constraint.

    affinity (T, E) float64. ``capacity=None``: every expert gets floor(T/E) or ceil(T/E) tokens (see module
    doc); else every expert gets at most ``capacity`` tokens (needs ``capacity * E >= T``).
    """
    T, E = affinity.shape
    if capacity is not None:
        cost = np.repeat(-affinity, capacity, axis=1)  # (T, E*capacity): column e*capacity + j = slot j of e
        _, cols = linear_sum_assignment(cost)  # rows come back sorted 0..T-1
        return cols // capacity
    slots = T // E + 1  # floor(T/E) mandatory slots and the last one optional
    cost = np.repeat(-affinity, slots, axis=1)  # (T, E*slots)
    n_dummy = E * slots - T  # = E - T mod E, in [1, E]
    dummy = np.full((n_dummy, E * slots), np.inf)  # dummy rows may take only optional slots (cost 0)
    dummy[:, slots - 1 :: slots] = 0.0
    _, cols = linear_sum_assignment(np.concatenate([cost, dummy]))  # square (E*slots, E*slots)
    return cols[:T] // slots


class BaseRouter(Router):
    """Learned linear gate; balanced linear assignment in training, top-1 in eval; weight sigmoid(affinity).

    Args:
        d_model: input width.
        num_experts: E.
        capacity: None for the balanced floor/ceil(T/E) assignment; else the most tokens one expert may take
            (must be at least ceil(T/E) for every batch routed in training).
        max_cost_entries: largest assignment cost matrix (rows * columns) solved before raising ValueError.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        capacity: int | None = None,
        max_cost_entries: int = MAX_COST_ENTRIES,
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, 1)
        for name, value in (("capacity", capacity), ("max_cost_entries", max_cost_entries)):
            if value is None and name == "capacity":
                continue  # capacity=None: balanced floor/ceil assignment
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, 1
        self.capacity, self.max_cost_entries = capacity, max_cost_entries
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), like nn.Linear
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if T == 0:
            return empty_routing(E, x.device)
        logits = fp32_logits(x, self.weight)  # (T, E) affinities
        if self.training:
            expert = self._assign(logits.detach())  # (T,)
        else:
            expert = logits.argmax(dim=-1)  # (T,)
        token_idx = torch.arange(T, device=x.device)
        weight = logits.gather(1, expert.unsqueeze(1)).squeeze(1).sigmoid()  # (T,), differentiable
        return Routing(token_idx, expert, weight, T, E, logits=logits, probs=logits.softmax(dim=-1))

    def _assign(self, affinity: Tensor) -> Tensor:
        """(T,) int64 balanced assignment of the (T, E) affinities, solved on the CPU in float64."""
        T, E = affinity.shape
        if self.capacity is not None and self.capacity * E < T:
            raise ValueError(
                f"capacity={self.capacity} is too small for {T} tokens and {E} experts "
                f"(capacity * num_experts must be >= {T}); use capacity >= {math.ceil(T / E)} or None"
            )
        cap = None if self.capacity is None else min(self.capacity, T)  # more than T slots are never used
        rows, cols = (T, E * cap) if cap is not None else (E * (T // E + 1), E * (T // E + 1))
        if rows * cols > self.max_cost_entries:
            raise ValueError(
                f"x has {T} tokens: the BASE assignment needs a ({rows}, {cols}) cost matrix, more than "
                f"max_cost_entries={self.max_cost_entries}; route fewer tokens per call or raise the limit"
            )
        expert = balanced_assignment(affinity.double().cpu().numpy(), cap)
        return torch.from_numpy(expert).to(device=affinity.device, dtype=torch.long)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, capacity={self.capacity}"
