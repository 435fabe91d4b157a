"""DynMoE top-any gating (Guo et al. 2024, "Dynamic Mixture of Experts: An Auto-Tuning Approach for Efficient
Transformer Models").

Every expert has a trainable gate vector ``W_g[e]`` (E, D) and a trainable threshold ``G[e]`` (E,). A token
activates *every* expert whose cosine score beats that expert's threshold, ``sigmoid(s_e) > sigmoid(G_e)``
with ``s = cos(x, W_g)``, so each token gets 0..E experts and the average k is learned, not set.

- Straight-through estimator: the hard gate ``1[sigmoid(s_e) - sigmoid(G_e) > 0]`` has no gradient, so the
  forward value 1 is used with the gradient of ``d_e = sigmoid(s_e) - sigmoid(G_e)`` (DynMoE's
  identity-backward sign): ``g_e = 1 + d_e - d_e.detach()`` on every selected pair. Gate vectors and
  thresholds both learn.
- Combine weight (our choice; the released DynMoE code averages the active experts): the scores softmaxed
  over the token's selected set A, times the straight-through gate,
  ``w_e = g_e * exp(s_e) / sum_{a in A} exp(s_a)``. The forward value is the plain masked softmax; the
  softmax lets the gate vectors learn which active expert should count most, and ``g_e`` carries the
  threshold gradient.
- Fallback: a token that activates no expert goes to its top-1 expert by score (weight 1, with the same
  straight-through factor so the threshold learns from it); ``Routing.stats["fallback_share"]`` counts them.
- Diversity loss ``Routing.losses["diversity"] = ||W_g W_g^T - I||_F``: pushes gate vectors apart
  (off-diagonal) and keeps them norm 1 (diagonal), as in the paper.
- Growing and shrinking E between steps: in training, the router records how often each expert was activated
  and the sum of the embeddings of tokens that activated none. ``unused_experts()`` lists experts with no
  activation over the last ``removal_window`` optimizer steps, ``needs_new_expert()`` says whether some
  token found no expert; ``add_expert()`` appends an expert whose gate vector is the normalised sum of those
  tokens, ``remove_expert(e)`` deletes one. Parameters are replaced, so optimizers must be rebuilt
  afterwards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.routing.base import Router, Routing, empty_routing, router_dtype
from moekit.routing.topk import check_router_sizes


def cosine_scores(x: Tensor, gate_vectors: Tensor) -> Tensor:
    """(T, E) cosine similarity of tokens x (T, D) and gate vectors (E, D), in float32 (or float64)."""
    dtype = router_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_n = F.normalize(x.to(dtype), dim=-1)  # (T, D)
        w_n = F.normalize(gate_vectors.to(dtype), dim=-1)  # (E, D)
        return x_n @ w_n.t()


def diversity_loss(gate_vectors: Tensor) -> Tensor:
    """``||W W^T - I||_F`` of the (E, D) gate vectors: 0 iff they are orthonormal.

    Not squared, as in the paper; like any norm it has a kink at 0, so at exactly orthonormal gates (the
    orthogonal init) its gradient has a rounding-noise direction, scaled by the loss weight.
    """
    E = gate_vectors.shape[0]
    gram = gate_vectors @ gate_vectors.t()  # (E, E)
    return (gram - torch.eye(E, dtype=gram.dtype, device=gram.device)).norm()


class TopAnyRouter(Router):
    """DynMoE top-any router: each token activates every expert whose cosine score beats its threshold.

    Args:
        d_model: input width D.
        num_experts: initial E.
        max_experts: upper bound on E for ``add_expert`` (None: unbounded).
        init_threshold: initial value of every threshold G_e (0: activate when the cosine score is > 0).
        removal_window: optimizer steps (``after_optimizer_step`` calls) to observe before ``unused_experts``
            may report an expert as unused.
    """

    fixed_k = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        max_experts: int | None = None,
        init_threshold: float = 0.0,
        removal_window: int = 100,
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, None)
        if max_experts is not None:
            if isinstance(max_experts, bool) or not isinstance(max_experts, int):
                raise TypeError(f"max_experts must be an int or None, got {type(max_experts).__name__}")
            if max_experts < num_experts:
                raise ValueError(f"max_experts must be >= num_experts ({num_experts}), got {max_experts}")
        if isinstance(init_threshold, bool) or not isinstance(init_threshold, (int, float)):
            raise TypeError(f"init_threshold must be a number, got {type(init_threshold).__name__}")
        if not math.isfinite(init_threshold):
            raise ValueError(f"init_threshold must be finite, got {init_threshold}")
        if isinstance(removal_window, bool) or not isinstance(removal_window, int):
            raise TypeError(f"removal_window must be an int, got {type(removal_window).__name__}")
        if removal_window < 1:
            raise ValueError(f"removal_window must be >= 1, got {removal_window}")
        self.d_model, self.num_experts = d_model, num_experts
        self.max_experts, self.init_threshold = max_experts, float(init_threshold)
        self.removal_window = removal_window
        # Orthogonal init (as DynMoE): distinct directions from the start, diversity loss near its minimum.
        self.gate_vectors = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, d_model)))  # (E, D)
        self.thresholds = nn.Parameter(torch.full((num_experts,), self.init_threshold))  # (E,)
        # Routing records for add/remove (training only); not part of the checkpoint.
        self.register_buffer("activation_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("unrouted_sum", torch.zeros(d_model), persistent=False)  # (D,) float32
        self.register_buffer("unrouted_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.steps_recorded = 0

    # ------------------------------------------------------------------ routing
    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if T == 0:
            routing = empty_routing(E, x.device)
            routing.losses["diversity"] = diversity_loss(self.gate_vectors.to(router_dtype(x)))
            routing.stats["fallback_share"] = 0.0
            return routing
        scores = cosine_scores(x, self.gate_vectors)  # (T, E) in [-1, 1]
        margin = scores.sigmoid() - self.thresholds.to(scores.dtype).sigmoid()  # (T, E) d_e
        active = margin > 0  # (T, E)
        none = ~active.any(dim=1)  # (T,) tokens that activated no expert
        top1 = F.one_hot(scores.argmax(dim=1), E).bool()  # (T, E)
        selected = active | (top1 & none.unsqueeze(1))  # (T, E), >= 1 per row

        masked = scores.masked_fill(~selected, float("-inf"))
        soft = masked.softmax(dim=1)  # (T, E), 0 off the selected set
        gate = 1.0 + (margin - margin.detach())  # straight-through: exactly 1, gradient of the margin
        weights = soft * gate  # (T, E)

        # Slot-major pairs: slot j holds each token's (j+1)-th best selected expert, tokens in order.
        order = masked.argsort(dim=1, descending=True, stable=True)  # (T, E)
        in_slot = selected.gather(1, order)  # (T, E): the first n_t slots of token t are True
        slot, token_idx = in_slot.t().nonzero(as_tuple=True)  # slot-major, token order inside a slot
        expert_idx = order[token_idx, slot]
        weight = weights[token_idx, expert_idx]

        if self.training:
            self._record(x, active, none)
        routing = Routing(token_idx, expert_idx, weight, T, E, logits=scores, probs=scores.softmax(dim=1))
        routing.losses["diversity"] = diversity_loss(self.gate_vectors.to(scores.dtype))
        routing.stats["fallback_share"] = none.float().mean().item()
        return routing

    @torch.no_grad()
    def _record(self, x: Tensor, active: Tensor, none: Tensor) -> None:
        """Accumulate per-expert activations and the tokens that found no expert (for add/remove)."""
        self.activation_counts += active.sum(dim=0)
        self.unrouted_sum += x[none].to(self.unrouted_sum.dtype).sum(dim=0)
        self.unrouted_count += none.sum()

    # ------------------------------------------------------------------ growing and shrinking
    def after_optimizer_step(self, tokens_per_expert: Tensor) -> None:
        """Count one optimizer step in the observation window. tokens_per_expert (E,) is only checked."""
        E = self.num_experts
        if tokens_per_expert.shape != (E,):
            raise ValueError(f"tokens_per_expert must have shape ({E},), got {tuple(tokens_per_expert.shape)}")
        self.steps_recorded += 1

    def unused_experts(self) -> list[int]:
        """Experts no token activated over the window (empty before ``removal_window`` steps or if all are).

        Remove them in descending index order so the remaining indices stay valid.
        """
        if self.steps_recorded < self.removal_window:
            return []
        unused = (self.activation_counts == 0).nonzero().squeeze(1).tolist()
        return [] if len(unused) == self.num_experts else unused

    def needs_new_expert(self) -> bool:
        """True when some token activated no expert since the last reset and ``max_experts`` allows growth."""
        room = self.max_experts is None or self.num_experts < self.max_experts
        return room and int(self.unrouted_count) > 0

    def reset_records(self) -> None:
        """Start a new observation window."""
        self.activation_counts.zero_()
        self.unrouted_sum.zero_()
        self.unrouted_count.zero_()
        self.steps_recorded = 0

    @torch.no_grad()
    def add_expert(self) -> int:
        """Append an expert; returns its index (the old E).

        Its gate vector is the normalised sum of the tokens that found no expert since the last reset
        (DynMoE), or a random unit vector if there were none; its threshold is ``init_threshold``. Clears
        those records.
        """
        E = self.num_experts
        if self.max_experts is not None and E >= self.max_experts:
            raise ValueError(f"cannot add an expert: num_experts={E} already equals max_experts={self.max_experts}")
        w = self.gate_vectors
        new = self.unrouted_sum.to(w.dtype)  # (D,)
        if int(self.unrouted_count) == 0 or float(new.norm()) == 0.0:
            new = torch.randn(self.d_model, dtype=w.dtype, device=w.device)
        new = F.normalize(new, dim=0)
        self.gate_vectors = nn.Parameter(torch.cat([w, new.unsqueeze(0)]))  # (E+1, D)
        g = self.thresholds
        self.thresholds = nn.Parameter(torch.cat([g, g.new_full((1,), self.init_threshold)]))  # (E+1,)
        self.activation_counts = torch.cat([self.activation_counts, self.activation_counts.new_zeros(1)])
        self.unrouted_sum.zero_()
        self.unrouted_count.zero_()
        self.num_experts = E + 1
        return E

    @torch.no_grad()
    def remove_expert(self, e: int) -> None:
        """Delete expert ``e``; later experts shift down by one."""
        E = self.num_experts
        if isinstance(e, bool) or not isinstance(e, int):
            raise TypeError(f"e must be an int, got {type(e).__name__}")
        if not 0 <= e < E:
            raise ValueError(f"e must lie in [0, {E}), got {e}")
        if E == 1:
            raise ValueError("cannot remove the last expert (num_experts=1)")
        keep = torch.tensor([i for i in range(E) if i != e], device=self.thresholds.device)  # (E-1,)
        self.gate_vectors = nn.Parameter(self.gate_vectors[keep].contiguous())
        self.thresholds = nn.Parameter(self.thresholds[keep].contiguous())
        self.activation_counts = self.activation_counts[keep]
        self.num_experts = E - 1

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, max_experts={self.max_experts}, "
            f"init_threshold={self.init_threshold}, removal_window={self.removal_window}"
        )
