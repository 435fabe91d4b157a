"""Top-p (dynamic) routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
Models").

p = softmax(x W) over all E experts, sorted descending. Each token takes experts in that order until their
cumulative probability reaches ``p`` (the smallest n with ``sum_{j<=n} p_(j) >= p``), clamped to
``[min_k, max_k]``: confident tokens use few experts, uncertain ones more. Combine weights are the kept
probabilities as they are (as in the paper), or divided by their sum with ``renormalize=True``.

Tokens get a variable number of experts (``fixed_k = False``). Pairs stay slot-major: slot j holds every token
that has a (j+1)-th expert, in token order. ``Routing.stats["mean_experts_per_token"]`` reports the average n.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, empty_routing, fp32_logits
from moekit.routing.topk import check_router_sizes


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")


class TopPRouter(Router):
    """Softmax router that keeps the smallest set of best experts whose probability mass reaches ``p``.

    Args:
        d_model: input width D.
        num_experts: E.
        max_k: most experts per token (1..E).
        p: probability mass to cover, in (0, 1].
        min_k: fewest experts per token (1..max_k).
        renormalize: divide each token's kept probabilities by their sum.
    """

    fixed_k = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        max_k: int,
        p: float = 0.5,
        min_k: int = 1,
        renormalize: bool = False,
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, None)
        _check_int("max_k", max_k, 1, num_experts)
        _check_int("min_k", min_k, 1, max_k)
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a number, got {type(p).__name__}")
        if not (0 < p <= 1 and math.isfinite(p)):
            raise ValueError(f"p must lie in (0, 1], got {p}")
        if not isinstance(renormalize, bool):
            raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
        self.d_model, self.num_experts = d_model, num_experts
        self.max_k, self.min_k, self.p = max_k, min_k, float(p)
        self.k = max_k  # upper bound, for code that sizes buffers by k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), like nn.Linear
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if T == 0:
            routing = empty_routing(E, x.device)
            routing.stats["mean_experts_per_token"] = 0.0
            return routing
        logits = fp32_logits(x, self.weight)  # (T, E)
        probs = logits.softmax(dim=-1)
        sorted_p, order = probs.detach().sort(dim=-1, descending=True)  # (T, E) each
        below = sorted_p.cumsum(dim=-1) < self.p  # (T, E): mass not yet reached after slot j
        n = (below.sum(dim=-1) + 1).clamp(self.min_k, self.max_k)  # (T,) experts per token
        in_slot = torch.arange(E, device=x.device) < n.unsqueeze(1)  # (T, E): the first n_t slots
        slot, token_idx = in_slot.t().nonzero(as_tuple=True)  # slot-major, token order inside a slot
        expert_idx = order[token_idx, slot]
        weight = probs[token_idx, expert_idx]  # (P,) differentiable
        if self.renormalize:
            kept = torch.zeros_like(probs[:, 0]).index_add(0, token_idx, weight)  # (T,) kept mass per token
            weight = weight / kept[token_idx]
        routing = Routing(token_idx, expert_idx, weight, T, E, logits=logits, probs=probs)
        routing.stats["mean_experts_per_token"] = float(n.float().mean())
        return routing

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, max_k={self.max_k}, p={self.p}, "
            f"min_k={self.min_k}, renormalize={self.renormalize}"
        )
