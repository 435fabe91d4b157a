"""Softmax top-k token-choice routing, in the variants the big open models use.

- ``"softmax_then_topk"`` (Qwen-MoE, OLMoE, Switch, GShard): p = softmax(logits) over all E experts, keep the
  top-k, optionally renormalise the kept k to sum to one (``renormalize``).
- ``"topk_then_softmax"`` (Mixtral): take the top-k logits, softmax over those k only. This is mathematically the
  same as softmax-then-renormalise, but is computed the way Mixtral does it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, empty_routing, fp32_logits, slot_major_pairs

SCORE_ORDERS = ("softmax_then_topk", "topk_then_softmax")


class TopKRouter(Router):
    """Learned linear gate, softmax scores, each token to its top-``k`` experts.

    Args:
        d_model: input width.
        num_experts: E.
        k: experts per token (1 <= k <= E).
        order: ``"softmax_then_topk"`` or ``"topk_then_softmax"`` (see module doc).
        renormalize: with ``softmax_then_topk``, divide the kept k probabilities by their sum.
        bias: add a learned bias to the logits.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        order: str = "softmax_then_topk",
        renormalize: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, k)
        if order not in SCORE_ORDERS:
            raise ValueError(f"order must be one of {SCORE_ORDERS}, got {order!r}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.order, self.renormalize = order, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), like nn.Linear
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T = x.shape[0]
        if T == 0:
            return empty_routing(self.num_experts, x.device)
        logits = fp32_logits(x, self.weight, self.bias)  # (T, E)
        probs = logits.softmax(dim=-1)
        if self.order == "topk_then_softmax":
            top_logits, top_idx = logits.topk(self.k, dim=-1)  # (T, K)
            top_w = top_logits.softmax(dim=-1)
        else:
            top_w, top_idx = probs.topk(self.k, dim=-1)
            if self.renormalize:
                top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w)
        return Routing(token_idx, expert_idx, weight, T, self.num_experts, logits=logits, probs=probs)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, order={self.order!r}"


def check_router_sizes(d_model: int, num_experts: int, k: int | None) -> None:
    """Shared argument checks with errors that name the argument."""
    for name, value in (("d_model", d_model), ("num_experts", num_experts)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
