"""GShard top-2 gating with random routing of the second expert (Lepikhin et al. 2020, "GShard: Scaling Giant
Models with Conditional Computation and Automatic Sharding", Algorithm 1).

p = softmax(x W) over all E experts; e1, e2 the two best experts, gates normalised over the two:
``g1 = p[e1] / (p[e1] + p[e2])``, ``g2 = p[e2] / (p[e1] + p[e2])`` (so g2 <= 1/2). Every token keeps its first
pair. The second pair is dropped when ``g2 < second_expert_threshold`` (train and eval) and, in training with
``random_routing``, is kept only with probability ``2 * g2`` (kept iff ``2 * g2 > u``, ``u ~ U(0, 1)``): a
token whose second expert barely matters rarely costs a second expert's compute. A dropped second pair
simply does not appear in the `Routing` and ``g1`` is not renormalised (as in the paper), so tokens get 1 or
2 experts (``fixed_k = False``).

The uniforms are drawn as one (T,) block ``torch.rand((T,), generator=generator)`` in the router dtype on the
generator's device, entry t for token t, only in training with ``random_routing``.
``Routing.stats["second_expert_share"]`` is the share of tokens that kept their second expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, empty_routing, fp32_logits
from moekit.routing.topk import check_router_sizes


class GShardRouter(Router):
    """Top-2 softmax router, normalised over the two; second expert randomly dropped in training.

    Args:
        d_model: input width D.
        num_experts: E >= 2.
        random_routing: in training, keep the second pair only with probability ``2 * g2``.
        second_expert_threshold: drop the second pair whenever its normalised gate ``g2`` is below this,
            in [0, 0.5]; 0 keeps it always (in eval).
        generator: optional ``torch.Generator`` the uniforms are drawn from (None: global RNG of the input's
            device). Settable later as ``router.generator``.
    """

    k = 2
    fixed_k = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        random_routing: bool = True,
        second_expert_threshold: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, None)
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2 for top-2 GShard routing, got {num_experts}")
        if not isinstance(random_routing, bool):
            raise TypeError(f"random_routing must be a bool, got {type(random_routing).__name__}")
        if isinstance(second_expert_threshold, bool) or not isinstance(second_expert_threshold, (int, float)):
            raise TypeError(f"second_expert_threshold must be a number, got {type(second_expert_threshold).__name__}")
        if not 0 <= second_expert_threshold <= 0.5:
            raise ValueError(f"second_expert_threshold must lie in [0, 0.5], got {second_expert_threshold}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.d_model, self.num_experts = d_model, num_experts
        self.random_routing = random_routing
        self.second_expert_threshold = float(second_expert_threshold)
        self.generator = generator
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), like nn.Linear
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def uniform(self, n: int, like: Tensor) -> Tensor:
        """(n,) uniforms in [0, 1) with the dtype and device of ``like``, drawn from ``self.generator``."""
        device = self.generator.device if self.generator is not None else like.device
        return torch.rand(n, generator=self.generator, dtype=like.dtype, device=device).to(like.device)

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if T == 0:
            routing = empty_routing(E, x.device)
            routing.stats["second_expert_share"] = 0.0
            return routing
        logits = fp32_logits(x, self.weight)  # (T, E)
        probs = logits.softmax(dim=-1)
        top_p, top_idx = probs.topk(2, dim=-1)  # (T, 2)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)  # (T, 2) g1, g2
        g2 = gates[:, 1].detach()  # (T,) the keep decision carries no gradient
        keep2 = g2 >= self.second_expert_threshold  # (T,)
        if self.training and self.random_routing:
            keep2 = keep2 & (2.0 * g2 > self.uniform(T, g2))
        second = keep2.nonzero().squeeze(1)  # (T2,) tokens keeping their second expert, in token order
        first = torch.arange(T, device=x.device)
        # Slot-major: every token's first pair, then the kept second pairs.
        token_idx = torch.cat([first, second])
        expert_idx = torch.cat([top_idx[:, 0], top_idx[second, 1]])
        weight = torch.cat([gates[:, 0], gates[second, 1]])
        routing = Routing(token_idx, expert_idx, weight, T, E, logits=logits, probs=probs)
        routing.stats["second_expert_share"] = second.numel() / T
        return routing

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, random_routing={self.random_routing}, "
            f"second_expert_threshold={self.second_expert_threshold}"
        )
