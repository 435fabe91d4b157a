"""MoELayer = router -> dispatcher -> experts -> combine.

``y = sum_{i in chosen(x)} G(x)_i * E_i(x)`` (+ shared experts), over the real tokens of any leading shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.dispatch.backends import check_backend
from moekit.dispatch.plan import DROP_POLICIES, DispatchPlan, plan_capacity, plan_dropless
from moekit.experts.grouped import GroupedFFN
from moekit.experts.heterogeneous import ExpertList
from moekit.experts.shared import SharedExperts
from moekit.losses import DEFAULT_LOSS_WEIGHTS, cv_squared, load_balance_loss, z_loss
from moekit.output import MoEOutput
from moekit.routing.base import Router, Routing
from moekit.routing.registry import build_router


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer.

    Args:
        d_model: input and output width D.
        d_ff: hidden width F of each expert (ignored when ``experts`` is given).
        num_experts: E.
        k: experts per token for token-choice routers (average experts per token for expert choice).
        router: a name from ``moekit.available_routers()`` or a ``Router`` instance.
        capacity_factor: None for dropless dispatch; else at most ``ceil(cf * pairs / E)`` pairs per expert
            in training, the rest dropped (zero output for that pair).
        eval_capacity_factor: capacity factor in eval mode (defaults to ``capacity_factor``).
        drop_policy: ``"position"`` (earlier pairs win) or ``"probability"`` (batch priority routing).
        min_capacity: lower bound on the per-expert capacity.
        activation: expert FFN activation: ``"swiglu"`` (default), ``"geglu"``, ``"gelu"``, ``"relu"``.
        experts: optional list of ``nn.Module`` (n, D) -> (n, D) for heterogeneous experts.
        num_shared_experts: always-on experts (fused into one FFN of width ``num_shared_experts * shared_d_ff``).
        shared_d_ff: width of each shared expert (defaults to ``d_ff``).
        shared_gate: scale the shared output by a learned sigmoid gate (Qwen2-MoE).
        backend: grouped GEMM backend: ``"auto"``, ``"grouped_mm"``, ``"bmm"`` or ``"loop"``.
        router_options: extra keyword arguments for the router constructor.
        loss_weights: weight of each named loss in ``MoEOutput.aux_loss`` (defaults: ``DEFAULT_LOSS_WEIGHTS``).
        check_finite: raise on NaN/inf at real tokens (masked positions are ignored; costs a device sync).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int | None,
        num_experts: int,
        k: int = 2,
        router: str | Router = "topk",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        drop_policy: str = "position",
        min_capacity: int = 0,
        activation: str = "swiglu",
        experts: list[nn.Module] | None = None,
        num_shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_gate: bool = False,
        backend: str = "auto",
        router_options: dict | None = None,
        loss_weights: dict[str, float] | None = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if d_model < 1 or num_experts < 1:
            raise ValueError(f"d_model and num_experts must be >= 1, got d_model={d_model}, num_experts={num_experts}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
        for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if cf is not None and (
                not isinstance(cf, (int, float)) or isinstance(cf, bool) or not cf > 0 or math.isinf(cf)
            ):
                raise ValueError(f"{name} must be a finite number > 0 or None, got {cf!r}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        if not isinstance(min_capacity, int) or min_capacity < 0:
            raise ValueError(f"min_capacity must be an int >= 0, got {min_capacity!r}")
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        check_backend(backend)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor if eval_capacity_factor is not None else capacity_factor
        self.drop_policy, self.min_capacity = drop_policy, min_capacity
        self.check_finite = check_finite
        self.loss_weights = dict(DEFAULT_LOSS_WEIGHTS if loss_weights is None else loss_weights)

        if isinstance(router, Router):
            if router.num_experts != num_experts:
                raise ValueError(f"router has {router.num_experts} experts but num_experts={num_experts}")
            self.router = router
        else:
            self.router = build_router(router, d_model=d_model, num_experts=num_experts, k=k, **(router_options or {}))

        if experts is not None:
            if len(experts) != num_experts:
                raise ValueError(f"experts has {len(experts)} modules but num_experts={num_experts}")
            self.experts: GroupedFFN | ExpertList = ExpertList(experts, d_model)
        else:
            if isinstance(d_ff, bool) or not isinstance(d_ff, int) or d_ff < 1:
                raise ValueError(f"d_ff must be a positive int when experts is not given, got {d_ff!r}")
            self.experts = GroupedFFN(d_model, d_ff, num_experts, activation=activation, backend=backend)
        self.shared = None
        if num_shared_experts:
            width = shared_d_ff if shared_d_ff is not None else d_ff
            if width is None:
                raise ValueError("shared_d_ff must be given for shared experts when d_ff is None")
            self.shared = SharedExperts(d_model, width, num_shared_experts, gate=shared_gate)
        # Load seen since the last optimizer step; read (and reset) by `after_optimizer_step`.
        self.register_buffer("load_since_step", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, mask: Tensor | None = None, token_ids: Tensor | None = None) -> MoEOutput:
        """x (..., D); mask (...) bool, True = real token; token_ids (...) int64 (hash routing)."""
        lead = self._check_inputs(x, mask, token_ids)
        D = self.d_model
        x_flat = x.reshape(-1, D)  # (N, D)
        seq_ids = _sequence_ids(lead, x.device)  # (N,)
        ids_flat = token_ids.reshape(-1) if token_ids is not None else None
        real_idx = None
        if mask is not None:
            real_idx = mask.reshape(-1).nonzero().squeeze(1)  # (T,)
            x_real = x_flat[real_idx]  # (T, D)
            seq_ids = seq_ids[real_idx]
            ids_flat = ids_flat[real_idx] if ids_flat is not None else None
        else:
            x_real = x_flat
        self._check_finite(x_real)

        routing = self.router(x_real, token_ids=ids_flat, seq_ids=seq_ids)
        plan = self._plan(routing)
        y_real = self._compute(x_real, plan)  # (T, D)
        if self.shared is not None:
            y_real = y_real + self.shared(x_real).to(y_real.dtype)
        y_real = y_real.to(x.dtype)

        if real_idx is not None:
            y_flat = x_flat.new_zeros(x_flat.shape).index_copy(0, real_idx, y_real)  # masked tokens stay zero
        else:
            y_flat = y_real
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.load_since_step += plan.routed
        losses = self._losses(routing)
        return MoEOutput(
            output=y_flat.reshape(x.shape),
            losses=losses,
            aux_loss=self._weighted(losses, x_real),
            stats=_routing_stats(routing, plan),
            router_logits=routing.logits,
        )

    def _plan(self, routing: Routing) -> DispatchPlan:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if cf is None:
            return plan_dropless(routing)
        return plan_capacity(routing, cf, self.drop_policy, self.min_capacity)

    def _compute(self, x_real: Tensor, plan: DispatchPlan) -> Tensor:
        """Gather rows by expert, run the experts, weighted scatter-add back to token order."""
        x_sorted = x_real.index_select(0, plan.token_idx)  # (S, D); its backward is a parallel index_add
        y_sorted = self.experts(x_sorted, plan.counts)  # (S, D)
        y_sorted = y_sorted * plan.weight.unsqueeze(1).to(y_sorted.dtype)
        out = y_sorted.new_zeros(x_real.shape[0], self.d_model)  # (T, D)
        return out.index_add(0, plan.token_idx, y_sorted)

    def _losses(self, routing: Routing) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if routing.probs is not None:
            losses["load_balance"] = load_balance_loss(routing.probs, routing.tokens_per_expert())
        if routing.logits is not None:
            losses["z_loss"] = z_loss(routing.logits)
        losses.update(routing.losses)
        return losses

    def _weighted(self, losses: dict[str, Tensor], x_real: Tensor) -> Tensor:
        dtype = torch.promote_types(x_real.dtype, torch.float32)  # float32, or float64 for float64 input
        total = x_real.new_zeros((), dtype=dtype)
        for name, value in losses.items():
            weight = self.loss_weights.get(name, 0.0)
            if weight:
                total = total + weight * value.to(dtype)
        return total

    def _check_inputs(self, x: Tensor, mask: Tensor | None, token_ids: Tensor | None) -> torch.Size:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex() or not x.is_floating_point():
            raise TypeError(f"x must be a real floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = real token), got {getattr(mask, 'dtype', mask)}")
            if mask.shape != lead:
                raise ValueError(
                    f"mask must have shape {tuple(lead)} (x without its last dim), got {tuple(mask.shape)}"
                )
        if token_ids is not None:
            if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
                raise TypeError("token_ids must be an integer tensor")
            if token_ids.shape != lead:
                raise ValueError(f"token_ids must have shape {tuple(lead)}, got {tuple(token_ids.shape)}")
        elif self.router.needs_token_ids:
            raise ValueError(f"token_ids are required by router {type(self.router).__name__} (hash routing)")
        return lead

    def _check_finite(self, x_real: Tensor) -> None:
        # Only real tokens: padding may hold anything (a NaN under the mask is never routed nor used).
        if self.check_finite and x_real.numel() and not bool(torch.isfinite(x_real).all()):
            raise ValueError("x contains NaN or infinite values at real (unmasked) tokens (check_finite=True)")

    # ------------------------------------------------------------------ hooks between steps
    def after_optimizer_step(self) -> None:
        """Run the router's between-steps hook (aux-loss-free bias, DynMoE) with the load since the last call."""
        load = self.load_since_step.clone()
        self.load_since_step.zero_()
        self.router.after_optimizer_step(load)

    def add_expert(self, init_from: int | None = None) -> int:
        """Grow E by one (DynMoE). Rebuild optimizers afterwards. Returns the new expert's index."""
        if not hasattr(self.router, "add_expert") or not isinstance(self.experts, GroupedFFN):
            raise TypeError("add_expert needs a router with add_expert() (e.g. 'dynmoe') and grouped experts")
        self.router.add_expert()
        idx = self.experts.add_expert(init_from)
        self._resize_load()
        return idx

    def remove_expert(self, e: int) -> None:
        """Shrink E by removing expert ``e`` (DynMoE). Rebuild optimizers afterwards."""
        if not hasattr(self.router, "remove_expert") or not isinstance(self.experts, GroupedFFN):
            raise TypeError("remove_expert needs a router with remove_expert() (e.g. 'dynmoe') and grouped experts")
        self.router.remove_expert(e)
        self.experts.remove_expert(e)
        self._resize_load()

    def _resize_load(self) -> None:
        self.num_experts = self.experts.num_experts
        self.load_since_step = torch.zeros(self.num_experts, dtype=torch.long, device=self.load_since_step.device)

    def active_flops_per_token(self) -> float:
        """Expert FLOPs one token costs on average (k experts plus shared ones), for equal-compute baselines."""
        per_expert = self.experts.flops_per_token() if isinstance(self.experts, GroupedFFN) else math.nan
        shared = self.shared.flops_per_token() if self.shared is not None else 0
        return self.k * per_expert + shared


def _sequence_ids(lead: torch.Size, device: torch.device) -> Tensor:
    """(N,) sequence index of each position: rows of the second-to-last leading dim; one sequence for (T, D)."""
    n = math.prod(lead)
    if len(lead) < 2:
        return torch.zeros(n, dtype=torch.long, device=device)
    seq_len = lead[-1]
    return torch.arange(n // max(seq_len, 1), device=device).repeat_interleave(seq_len)


@torch.no_grad()
def _routing_stats(routing: Routing, plan: DispatchPlan) -> dict[str, Tensor]:
    T = routing.num_tokens
    kept_per_token = torch.bincount(plan.token_idx, minlength=T)  # (T,)
    pairs = max(routing.num_pairs, 1)
    stats = {
        "tokens_per_expert": plan.routed.detach(),
        "dropped_per_expert": plan.dropped.detach(),
        "num_tokens": torch.tensor(T),
        "dropped_share": plan.dropped.sum().float() / pairs,
        "zero_expert_share": (kept_per_token == 0).float().mean() if T else torch.tensor(0.0),
        "experts_per_token": kept_per_token.float().mean() if T else torch.tensor(0.0),
        "load_cv": cv_squared(plan.routed).sqrt(),
    }
    if routing.probs is not None and T:
        p = routing.probs.detach()
        stats["router_entropy"] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    for name, value in routing.stats.items():
        stats[name] = torch.as_tensor(value)
    return stats
