"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Instead of each token picking its experts, each expert picks its ``C`` highest-scoring tokens of the batch,
so every expert is exactly full (no load-balance loss needed, no drops) and a token may get 0..E experts.

Causal-LM caveat: an expert's choice depends on the scores of *all* tokens in the batch, including tokens
later in the same sequence. In autoregressive decoding those tokens do not exist yet, so training-time
expert choice leaks future information and cannot be reproduced token by token at inference. For causal LMs
use ``inference_mode="topk"`` (the default): in eval each token goes to its own top-``k`` experts by the
same scores.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, ceil_scaled, empty_routing, fp32_logits, slot_major_pairs
from moekit.routing.topk import check_router_sizes

INFERENCE_MODES = ("topk", "expert_choice")


def expert_choice_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Tokens each expert takes: ``C = min(T, ceil(T * k * capacity_factor / E))``, in exact arithmetic.

    ``capacity_factor`` counts as the decimal it prints as (1.1 is 11/10), so a product that is an integer on
    paper (1.1 * 10 * 1 / 1 = 11) gives exactly that capacity, not one more from float rounding.
    """
    return min(num_tokens, ceil_scaled(capacity_factor, num_tokens * k, num_experts))


class ExpertChoiceRouter(Router):
    """Learned linear gate; each expert takes its top-``C`` tokens by softmax score.

    Scores ``S = softmax(x W^T)`` over experts (T, E); expert ``e`` takes the ``C`` tokens with the largest
    ``S[:, e]`` (see ``expert_choice_capacity``) and the pair weight is ``S[t, e]``. Pairs are expert-major
    (expert 0's tokens, best first, then expert 1's, ...). ``Routing.stats["unrouted_share"]`` is the share of
    tokens that no expert took (they get a zero MoE output).

    Args:
        d_model: input width.
        num_experts: E.
        k: average number of experts per token (1 <= k <= E); sets the capacity, and the per-token k in eval
            with ``inference_mode="topk"``.
        capacity_factor: scales the capacity (default 1.0).
        inference_mode: what to do in eval: ``"topk"`` (each token to its own top-k experts by S, weights S
            unnormalised as in training; safe for causal LMs, see module doc) or ``"expert_choice"`` (same as
            training).
    """

    fixed_k = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        inference_mode: str = "topk",
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, k)
        if capacity_factor is None:
            capacity_factor = 1.0
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
            raise TypeError(f"capacity_factor must be a number or None, got {type(capacity_factor).__name__}")
        if not capacity_factor > 0 or math.isinf(capacity_factor):
            raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES}, got {inference_mode!r}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.capacity_factor = float(capacity_factor)
        self.inference_mode = inference_mode
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), like nn.Linear
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes for a batch of ``num_tokens`` real tokens."""
        return expert_choice_capacity(num_tokens, self.num_experts, self.k, self.capacity_factor)

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if T == 0:
            return empty_routing(E, x.device)
        logits = fp32_logits(x, self.weight)  # (T, E)
        probs = logits.softmax(dim=-1)  # (T, E) token-expert scores S
        if not self.training and self.inference_mode == "topk":
            top_w, top_idx = probs.topk(self.k, dim=-1)  # (T, K)
            token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w)
            stats = {"unrouted_share": 0.0}
            return Routing(token_idx, expert_idx, weight, T, E, logits=logits, probs=probs, stats=stats)

        C = self.capacity(T)
        top_w, top_tok = probs.t().topk(C, dim=-1)  # (E, C): each expert's best tokens, best first
        token_idx = top_tok.reshape(-1)  # (E*C,) expert-major
        expert_idx = torch.arange(E, device=x.device).repeat_interleave(C)  # (E*C,)
        weight = top_w.reshape(-1)
        with torch.no_grad():
            taken = torch.zeros(T, dtype=torch.bool, device=x.device).index_fill_(0, token_idx, True)  # (T,)
            unrouted_share = 1.0 - taken.float().mean().item()
        stats = {"unrouted_share": unrouted_share}
        return Routing(token_idx, expert_idx, weight, T, E, logits=logits, probs=probs, stats=stats)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"capacity_factor={self.capacity_factor}, inference_mode={self.inference_mode!r}"
        )
