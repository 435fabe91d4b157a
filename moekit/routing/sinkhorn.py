"""S-BASE routing (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models").

BASE layers solve a balanced assignment exactly (``base_layer.py``); S-BASE approximates it with a few
Sinkhorn iterations, which are cheap and run on the accelerator. In training, ``exp(logits)`` is
Sinkhorn-normalised to a matrix whose rows sum to 1 and whose columns sum to T/E (every expert gets an equal
share of the mass), and each token takes its top-k experts *from that balanced matrix*. The normalisation
only decides the assignment: it runs in ``no_grad``, and the combine weight comes from the router's original
logit of the chosen expert, so the gradient flows through the gate as in plain top-k routing. In eval the
experts are plain top-k of the logits.

Combine weight (as in Megatron-LM's Sinkhorn router): ``sigmoid(logit)`` of the chosen expert for k = 1, and
the softmax over all experts of the original logits, gathered at the chosen experts, for k > 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, empty_routing, fp32_logits, slot_major_pairs
from moekit.routing.topk import check_router_sizes


@torch.no_grad()
def sinkhorn_log(logits: Tensor, n_iters: int, eps: float | None = None) -> Tensor:
    """(T, E) log of the Sinkhorn-normalised ``exp(logits)``: rows sum to 1, columns to T/E.

    Works in the log domain (``logsumexp``), so large logits cannot overflow. Each iteration scales the rows,
    then the columns; the last step is a column step, so columns are exact and rows approximate. With ``eps``,
    stops early once every row sum is within ``eps`` of 1 (one device sync per iteration).
    """
    T, E = logits.shape
    log_col = math.log(T / E)
    log_u = logits.new_zeros(T, 1)  # (T, 1) row scalings
    log_v = logits.new_zeros(1, E)  # (1, E) column scalings
    for _ in range(n_iters):
        log_u = -torch.logsumexp(logits + log_v, dim=1, keepdim=True)
        log_v = log_col - torch.logsumexp(logits + log_u, dim=0, keepdim=True)
        if eps is not None:
            row_sums = torch.logsumexp(logits + log_u + log_v, dim=1).exp()  # (T,)
            if float((row_sums - 1).abs().max()) < eps:
                break
    return logits + log_u + log_v


class SinkhornRouter(Router):
    """Learned linear gate; in training, top-k of the Sinkhorn-balanced scores; in eval, top-k of the logits.

    Args:
        d_model: input width.
        num_experts: E.
        k: experts per token (1 <= k <= E).
        n_iters: Sinkhorn iterations (at most, with ``eps``).
        eps: optional early-stop tolerance on the row sums (None: always ``n_iters`` iterations, no syncs).
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 1, n_iters: int = 8, eps: float | None = None) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, k)
        if isinstance(n_iters, bool) or not isinstance(n_iters, int):
            raise TypeError(f"n_iters must be an int, got {type(n_iters).__name__}")
        if n_iters < 1:
            raise ValueError(f"n_iters must be >= 1, got {n_iters}")
        if eps is not None:
            if isinstance(eps, bool) or not isinstance(eps, (int, float)):
                raise TypeError(f"eps must be a number or None, got {type(eps).__name__}")
            if not eps > 0:
                raise ValueError(f"eps must be > 0 or None, got {eps}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.n_iters, self.eps = n_iters, eps
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), like nn.Linear
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def gate(self, logits: Tensor) -> Tensor:
        """(T, E) combine weights of every expert: sigmoid for k = 1, softmax over experts for k > 1."""
        return logits.sigmoid() if self.k == 1 else logits.softmax(dim=-1)

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T = x.shape[0]
        if T == 0:
            return empty_routing(self.num_experts, x.device)
        logits = fp32_logits(x, self.weight)  # (T, E)
        if self.training:
            balanced = sinkhorn_log(logits.detach(), self.n_iters, self.eps)  # (T, E)
            top_idx = balanced.topk(self.k, dim=-1).indices  # (T, K)
        else:
            top_idx = logits.topk(self.k, dim=-1).indices  # sigmoid and softmax keep the logit order
        top_w = self.gate(logits).gather(1, top_idx)  # (T, K), differentiable
        token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w)
        return Routing(token_idx, expert_idx, weight, T, self.num_experts, logits=logits, probs=logits.softmax(dim=-1))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
            f"n_iters={self.n_iters}, eps={self.eps}"
        )
