"""Switch routing (Fedus et al. 2021, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
and Efficient Sparsity").

Top-1: p = softmax(x W) over all E experts, each token goes to ``argmax p`` with combine weight ``p[argmax]``
(the probability itself, not renormalised to 1, so the gate stays differentiable). In training an optional
multiplicative input jitter ``x * u``, ``u ~ U(1 - jitter, 1 + jitter)`` elementwise, explores the routing
(the paper's "jitter noise" on the router input).

Jitter is drawn as one (T, D) block ``u01 = torch.rand((T, D), generator=generator)`` in the router dtype on
the generator's device, then ``u = 1 - jitter + 2 * jitter * u01``; row t is token t's multiplier.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.routing.base import Router, Routing, empty_routing, fp32_logits, router_dtype, slot_major_pairs
from moekit.routing.topk import check_router_sizes


class SwitchRouter(Router):
    """Top-1 softmax router with optional multiplicative input jitter in training.

    Args:
        d_model: input width D.
        num_experts: E.
        jitter: half-width of the multiplicative uniform input noise, in [0, 1); 0 disables it.
        generator: optional ``torch.Generator`` the jitter is drawn from (None: global RNG of the input's
            device). Settable later as ``router.generator``.
    """

    k = 1

    def __init__(
        self, d_model: int, num_experts: int, jitter: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, None)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)):
            raise TypeError(f"jitter must be a number, got {type(jitter).__name__}")
        if not (0 <= jitter < 1 and math.isfinite(jitter)):
            raise ValueError(f"jitter must lie in [0, 1), got {jitter}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.d_model, self.num_experts = d_model, num_experts
        self.jitter = float(jitter)
        self.generator = generator
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D), like nn.Linear
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def jitter_factor(self, like: Tensor) -> Tensor:
        """Multiplier ``u ~ U(1 - jitter, 1 + jitter)`` with the shape, dtype and device of ``like``."""
        device = self.generator.device if self.generator is not None else like.device
        u01 = torch.rand(like.shape, generator=self.generator, dtype=like.dtype, device=device)
        return 1.0 - self.jitter + 2.0 * self.jitter * u01.to(like.device)

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.num_experts
        if T == 0:
            return empty_routing(E, x.device)
        if self.training and self.jitter > 0:
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = x.to(router_dtype(x))
                x = x * self.jitter_factor(x)  # (T, D)
        logits = fp32_logits(x, self.weight)  # (T, E)
        probs = logits.softmax(dim=-1)
        top_w, top_idx = probs.topk(1, dim=-1)  # (T, 1) each
        token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w)
        return Routing(token_idx, expert_idx, weight, T, E, logits=logits, probs=probs)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, jitter={self.jitter}"
