"""The value object every router produces and every dispatcher consumes.

A router looks at the real (unmasked) tokens of a batch and decides which (token, expert) pairs exist and with
which weight. It says nothing about how the pairs are computed: the dispatcher never asks which router made a
`Routing`, and the per-token reference loop (`moekit.reference`) consumes the very same object.

Pair order is meaningful: routers emit pairs *slot-major* (every token's first choice, then every token's second
choice, ...; token order inside a slot). Capacity dispatch with ``drop_policy="position"`` keeps the earliest pairs,
which is the GShard / Switch convention (first choices beat second choices, earlier tokens beat later ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor, nn


@dataclass
class Routing:
    """Which (token, expert) pairs exist, with which weight.

    Shapes: ``T`` real tokens, ``E`` experts, ``P`` token-expert pairs.

    - ``token_idx`` (P,) int64 in [0, T); ``expert_idx`` (P,) int64 in [0, E).
    - ``weight`` (P,) float32 (float64 for float64 input) combine weight, differentiable w.r.t. the router parameters.
    - ``priority`` (P,) float32 used by capacity dispatch with ``drop_policy="probability"`` (higher is kept first).
    - ``logits`` (T, E) float32 raw router logits (for z-loss), or None for routers without logits (hash).
    - ``probs`` (T, E) float32 router probabilities over all experts (for the load-balance loss), or None.
    - ``losses``: router-specific losses (noisy top-k importance/load, DynMoE diversity, DeepSeek sequence loss).
    - ``stats``: router-specific statistics (floats), merged into the layer's stats.
    """

    token_idx: Tensor
    expert_idx: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    logits: Tensor | None = None
    probs: Tensor | None = None
    priority: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return int(self.token_idx.numel())

    def pair_priority(self) -> Tensor:
        """(P,) priority for probability-ordered capacity drops; defaults to the combine weight."""
        return self.priority if self.priority is not None else self.weight.detach()

    def experts_per_token(self) -> Tensor:
        """(T,) int64: how many experts each token was sent to (0..E)."""
        return torch.bincount(self.token_idx, minlength=self.num_tokens)

    def tokens_per_expert(self) -> Tensor:
        """(E,) int64: how many tokens each expert was asked to process (before any capacity drop)."""
        return torch.bincount(self.expert_idx, minlength=self.num_experts)

    def validate(self) -> None:
        """Check the invariants every dispatcher relies on; raises ValueError naming the field."""
        P = self.token_idx.numel()
        for name in ("expert_idx", "weight"):
            if getattr(self, name).shape != (P,):
                raise ValueError(f"Routing.{name} must have shape ({P},), got {tuple(getattr(self, name).shape)}")
        if self.token_idx.dtype != torch.long or self.expert_idx.dtype != torch.long:
            raise ValueError("Routing.token_idx and Routing.expert_idx must be int64")
        if P:
            if int(self.token_idx.min()) < 0 or int(self.token_idx.max()) >= self.num_tokens:
                raise ValueError(f"Routing.token_idx must lie in [0, {self.num_tokens})")
            if int(self.expert_idx.min()) < 0 or int(self.expert_idx.max()) >= self.num_experts:
                raise ValueError(f"Routing.expert_idx must lie in [0, {self.num_experts})")


def empty_routing(num_experts: int, device: torch.device, with_logits: bool = True) -> Routing:
    """The routing of an empty batch (T = 0)."""
    long = torch.empty(0, dtype=torch.long, device=device)
    logits = torch.empty(0, num_experts, device=device) if with_logits else None
    return Routing(
        token_idx=long,
        expert_idx=long.clone(),
        weight=torch.empty(0, device=device),
        num_tokens=0,
        num_experts=num_experts,
        logits=logits,
        probs=None if logits is None else logits.clone(),
    )


class Router(nn.Module):
    """Base class of all routers.

    Subclasses implement ``route``; ``forward`` is the same call. Routers run their math in float32 even under
    autocast (ST-MoE: router logits in low precision destabilise training).

    ``x`` is (T, d_model) holding only real tokens. ``token_ids`` (T,) int64 are the vocabulary ids (hash routing);
    ``seq_ids`` (T,) int64 say which sequence each token came from (sequence-wise losses).
    """

    num_experts: int
    #: True when a router needs ``token_ids`` (hash routing).
    needs_token_ids: bool = False
    #: True when each token always gets exactly ``k`` experts.
    fixed_k: bool = True

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        raise NotImplementedError

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        return self.route(x, token_ids=token_ids, seq_ids=seq_ids)

    def after_optimizer_step(self, tokens_per_expert: Tensor) -> None:
        """Hook run between steps with the load (E,) observed since the last call (aux-loss-free bias, DynMoE)."""


def router_dtype(x: Tensor) -> torch.dtype:
    """Routers compute in float32, or in float64 when the input is float64 (tests, verification)."""
    return torch.promote_types(x.dtype, torch.float32)


def fp32_logits(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """(T, E) router logits in at least float32, with autocast disabled (see ``router_dtype``)."""
    dtype = router_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def slot_major_pairs(topk_idx: Tensor, topk_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Turn (T, K) top-k choices into slot-major pairs: token_idx, expert_idx, weight, each (T*K,)."""
    T, K = topk_idx.shape
    token_idx = torch.arange(T, device=topk_idx.device).repeat(K)  # (K*T,) slot-major
    expert_idx = topk_idx.t().reshape(-1)
    weight = topk_weight.t().reshape(-1)
    return token_idx, expert_idx, weight


def ceil_scaled(factor: float, numerator: int, denominator: int) -> int:
    """Exact ``ceil(factor * numerator / denominator)``, with ``factor`` read as the decimal it prints as.

    Float arithmetic lands on the wrong side of integer boundaries (``1.1 * 100 / 10`` is ``11.000000000000002``,
    whose ceil is 12); the capacity formulas mean the decimal the user wrote, so it is evaluated as a fraction.
    """
    exact = Fraction(factor) if isinstance(factor, int) else Fraction(repr(float(factor)))
    q = exact * numerator / denominator
    return -(-q.numerator // q.denominator)
