"""DeepSeek-V3 routing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report"), matching Hugging Face transformers'
``DeepseekV3TopkRouter`` (same parameter ``weight`` (E, D) and buffer ``e_score_correction_bias`` (E,), so a
checkpoint's ``mlp.gate.*`` tensors load as they are).

- Scores ``s = sigmoid(x W)`` (T, E), each expert judged on its own (no softmax competition).
- Selection only: ``s + e_score_correction_bias``. Experts are split into ``n_group`` equal groups; a group's
  score is the sum of its two best biased scores (its one score for groups of a single expert, where
  transformers would fail); each token keeps its ``topk_group`` best groups and takes its top ``k`` experts by
  biased score among them (slot j holds the (j+1)-th best; Hugging Face returns them unordered).
- Combine weights: the *unbiased* scores of the chosen experts, divided by their sum (+1e-20, as in
  transformers) if ``norm_topk_prob``, times ``routed_scaling_factor``.
- Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
  Mixture-of-Experts"): between optimizer steps ``after_optimizer_step(load)`` moves the bias by
  ``bias_update_speed * sign(mean(load) - load)``: overloaded experts become less likely to be chosen. The
  bias is never learned by gradient and never changed in ``forward``.
- Optional sequence-wise balance loss (DeepSeek-V3 eq. 17-20), ``Routing.losses["seq_balance"]``, unweighted
  (alpha is the layer's ``loss_weights["seq_balance"]``): per sequence of T_s tokens,
  ``f_i = E / (k T_s) * #{t: i chosen for t}``, ``P_i = mean_t s'_{i,t}`` with ``s' = s / sum_j s_j``, loss
  ``sum_i f_i P_i``, averaged over the sequences present (1.0 when perfectly balanced). Sequences are given by
  ``seq_ids`` (T,); without them the batch is one sequence.

``Routing.logits`` are the raw ``x W`` (for z-loss); ``Routing.probs`` are the normalised sigmoid scores
``s / s.sum(-1)`` (T, E), rows summing to 1, so the Switch load-balance loss has a distribution to work with.

The bias buffer follows the module's dtype; keep the router in float32 (as DeepSeek does) when training with
the bias update, since steps of 1e-3 vanish in bfloat16 once the bias is away from zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, empty_routing, fp32_logits, slot_major_pairs
from moekit.routing.topk import check_router_sizes


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def group_limited_topk(scores_for_choice: Tensor, k: int, n_group: int, topk_group: int) -> Tensor:
    """(T, k) expert indices, best first: top ``k`` of (T, E) ``scores_for_choice`` within each token's
    ``topk_group`` best groups (group score: sum of the group's top-2 entries)."""
    T, E = scores_for_choice.shape
    if topk_group == n_group:  # every group kept (e.g. n_group = 1): plain top-k
        return scores_for_choice.topk(k, dim=-1).indices
    grouped = scores_for_choice.view(T, n_group, E // n_group)  # (T, G, E/G)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)  # (T, G)
    group_idx = group_scores.topk(topk_group, dim=-1).indices  # (T, topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, group_idx, True)  # (T, G)
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)  # (T, E)
    masked = scores_for_choice.masked_fill(~expert_mask, float("-inf"))
    return masked.topk(k, dim=-1).indices  # (T, k), sorted descending


def sequence_balance_loss(probs: Tensor, top_idx: Tensor, seq_ids: Tensor | None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss (eq. 17-20), averaged over sequences; 1.0 when balanced.

    ``probs`` (T, E) normalised scores s'; ``top_idx`` (T, k) chosen experts; ``seq_ids`` (T,) or None.
    """
    T, E = probs.shape
    k = top_idx.shape[1]
    if seq_ids is None:
        seq = torch.zeros(T, dtype=torch.long, device=probs.device)
        S = 1
    else:
        uniq, seq = torch.unique(seq_ids, return_inverse=True)  # seq (T,) in [0, S)
        S = uniq.numel()
    chosen = torch.zeros_like(probs).scatter(1, top_idx, 1.0)  # (T, E) indicator, no gradient
    n_tokens = torch.bincount(seq, minlength=S).to(probs.dtype).unsqueeze(1)  # (S, 1)
    counts = probs.new_zeros(S, E).index_add(0, seq, chosen)  # (S, E)
    f = counts * (E / k) / n_tokens  # (S, E)
    P = probs.new_zeros(S, E).index_add(0, seq, probs) / n_tokens  # (S, E)
    return (f * P).sum(dim=1).mean()


class DeepSeekRouter(Router):
    """Sigmoid scores, bias-corrected group-limited top-k, auxiliary-loss-free bias balancing.

    Args:
        d_model: input width D.
        num_experts: E, divisible by ``n_group``.
        k: experts per token, at most the experts in ``topk_group`` groups.
        n_group: number of expert groups G.
        topk_group: groups each token may use (1..G).
        routed_scaling_factor: multiplies the combine weights (> 0).
        norm_topk_prob: divide the chosen scores by their sum.
        bias_update_speed: step of the bias update in ``after_optimizer_step`` (>= 0; 0 freezes the bias).
        seq_aux_loss: add the sequence-wise balance loss as ``Routing.losses["seq_balance"]``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        norm_topk_prob: bool = True,
        bias_update_speed: float = 1e-3,
        seq_aux_loss: bool = False,
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, k)
        _check_int("n_group", n_group, 1)
        _check_int("topk_group", topk_group, 1)
        if num_experts % n_group:
            raise ValueError(f"n_group must divide num_experts={num_experts}, got n_group={n_group}")
        if topk_group > n_group:
            raise ValueError(f"topk_group must be <= n_group ({n_group}), got {topk_group}")
        reachable = topk_group * (num_experts // n_group)
        if k > reachable:
            raise ValueError(
                f"k must be <= topk_group * num_experts / n_group = {reachable} (the experts in the kept "
                f"groups), got {k}"
            )
        _check_number("routed_scaling_factor", routed_scaling_factor)
        if not routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {routed_scaling_factor}")
        _check_number("bias_update_speed", bias_update_speed)
        if bias_update_speed < 0:
            raise ValueError(f"bias_update_speed must be >= 0, got {bias_update_speed}")
        for name, flag in (("norm_topk_prob", norm_topk_prob), ("seq_aux_loss", seq_aux_loss)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.norm_topk_prob = norm_topk_prob
        self.bias_update_speed = float(bias_update_speed)
        self.seq_aux_loss = seq_aux_loss
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), as transformers names it
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))
        # Not a parameter: moved only by `after_optimizer_step`; persistent, as in DeepSeek-V3 checkpoints.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))  # (E,)

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if seq_ids is not None:
            if not isinstance(seq_ids, Tensor) or seq_ids.is_floating_point() or seq_ids.is_complex():
                raise TypeError("seq_ids must be an integer tensor or None")
            if seq_ids.shape != (T,):
                raise ValueError(f"seq_ids must have shape ({T},), got {tuple(seq_ids.shape)}")
        if T == 0:
            routing = empty_routing(E, x.device)
            if self.seq_aux_loss:
                routing.losses["seq_balance"] = torch.zeros((), device=x.device)
            return routing
        logits = fp32_logits(x, self.weight)  # (T, E)
        scores = logits.sigmoid()  # (T, E)
        bias = self.e_score_correction_bias.to(scores.dtype)  # (E,) selection only
        top_idx = group_limited_topk(scores.detach() + bias, self.k, self.n_group, self.topk_group)  # (T, K)
        top_w = scores.gather(1, top_idx)  # (T, K) unbiased, differentiable
        if self.norm_topk_prob:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        top_w = top_w * self.routed_scaling_factor
        probs = scores / scores.sum(dim=-1, keepdim=True)  # (T, E) s'
        token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w)
        routing = Routing(token_idx, expert_idx, weight, T, E, logits=logits, probs=probs)
        if self.seq_aux_loss:
            routing.losses["seq_balance"] = sequence_balance_loss(probs, top_idx, seq_ids)
        return routing

    @torch.no_grad()
    def after_optimizer_step(self, tokens_per_expert: Tensor) -> None:
        """Aux-loss-free balancing: ``bias += speed * sign(mean(load) - load)`` with the load (E,) observed
        since the last call (tokens routed to each expert)."""
        E = self.num_experts
        if not isinstance(tokens_per_expert, Tensor):
            raise TypeError(f"tokens_per_expert must be a tensor, got {type(tokens_per_expert).__name__}")
        if tokens_per_expert.shape != (E,):
            raise ValueError(f"tokens_per_expert must have shape ({E},), got {tuple(tokens_per_expert.shape)}")
        bias = self.e_score_correction_bias
        load = tokens_per_expert.to(bias.device)
        # sign(mean - load) = sign(sum - E * load): exact for integer counts, no division.
        direction = (load.sum() - E * load).sign().to(bias.dtype)  # (E,) in {-1, 0, 1}
        bias += self.bias_update_speed * direction

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, n_group={self.n_group}, "
            f"topk_group={self.topk_group}, routed_scaling_factor={self.routed_scaling_factor}, "
            f"norm_topk_prob={self.norm_topk_prob}"
        )
