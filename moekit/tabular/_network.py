"""The tabular MoE network: moekit's ``TopKRouter`` gate over the features, experts from features to outputs.

``f(x) = sum_{e in chosen(x)} g_e(x) * expert_e(x)``. Sparse mode keeps the top-``k`` experts per row (weights
renormalised over the k); soft mode is top-``E``: every expert, weighted by the full softmax.

Built-in experts live in one ``ExpertBank`` (3-D weights): every expert runs on every row in one batched matmul per
layer and the sparse gate zeroes the unchosen ones, which at tabular widths is faster on CPU than gathering rows.
User modules (an ``nn.ModuleList``) are dispatched with moekit's dropless plan: each computes only its own rows.
An optional shared linear expert is added to every row's output (always on, outside the gate).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.dispatch.plan import plan_dropless
from moekit.losses import importance_loss, load_balance_loss, z_loss
from moekit.routing.base import Routing, fp32_logits
from moekit.routing.topk import TopKRouter
from moekit.tabular._experts import ExpertBank


class TabularMoE(nn.Module):
    """Gate + experts. ``forward(x)`` (n, n_in) -> (output (n, n_out), balance loss)."""

    def __init__(
        self, n_in: int, n_out: int, experts: ExpertBank | nn.ModuleList, k: int | None, shared: bool = False
    ) -> None:
        super().__init__()
        n_experts = experts.num_experts if isinstance(experts, ExpertBank) else len(experts)
        if n_experts == 0:
            raise ValueError("TabularMoE needs at least one expert, got an empty list")
        self.n_in, self.n_out, self.n_experts = n_in, n_out, n_experts
        self.soft = k is None
        self.router = TopKRouter(n_in, n_experts, k=n_experts if k is None else k, renormalize=True, bias=True)
        self.experts = experts
        # Always-on linear expert (DeepSeek-style shared expert); the estimators warm-start it at a linear fit.
        self.shared = nn.Linear(n_in, n_out) if shared else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(n, n_in) -> (output (n, n_out), auxiliary balance loss (scalar))."""
        if self.soft:  # top-E renormalised is the softmax itself: skip the sort
            logits = fp32_logits(x, self.router.weight, self.router.bias)  # (n, E)
            gates = logits.softmax(dim=-1)
            aux = importance_loss(gates) + 1e-3 * z_loss(logits)
            out = self._combine(x, gates.to(x.dtype), None)
        else:
            routing = self.router(x)
            aux = load_balance_loss(routing.probs, routing.tokens_per_expert()) - 1 + 1e-3 * z_loss(routing.logits)
            out = self._combine(x, None, routing)
        if self.shared is not None:
            out = out + self.shared(x)
        return out, aux

    def _combine(self, x: Tensor, gates: Tensor | None, routing: Routing | None) -> Tensor:
        if isinstance(self.experts, ExpertBank):
            g = gates if gates is not None else _dense(routing, self.n_experts).to(x.dtype)
            return torch.einsum("ne,eno->no", g, self.experts(x))  # experts output (E, n, n_out)
        if routing is None:
            routing = self.router(x)  # user modules: dispatch through moekit's dropless plan
        plan = plan_dropless(routing)
        out = x.new_zeros(x.shape[0], self.n_out)
        start = 0
        for e, n in enumerate(plan.counts.tolist()):
            if n:
                rows = plan.token_idx[start : start + n]
                w = plan.weight[start : start + n].to(x.dtype).unsqueeze(1)
                out = out.index_add(0, rows, w * self.experts[e](x[rows]))
                start += n
        return out

    @torch.no_grad()
    def gates(self, x: Tensor) -> Tensor:
        """(n, E) combine weight of every expert for every row (zero where a row is not routed)."""
        return _dense(self.router(x), self.n_experts)


def _dense(routing: Routing, n_experts: int) -> Tensor:
    """The routing's pairs as a dense (n, E) gate matrix, differentiable w.r.t. the weights."""
    g = routing.weight.new_zeros(routing.num_tokens, n_experts)
    return g.index_put((routing.token_idx, routing.expert_idx), routing.weight)
