"""A moekit ``Router`` that calls a transformers router module and turns its choice into a ``Routing``.

Calling the very module transformers built keeps two things exact: the choice itself (same ops, same dtype
casts, same tie-breaking as the unpatched model) and ``output_router_logits``: transformers 5 records
router logits with forward hooks on the router class (``OutputRecorder(MixtralTopKRouter, index=0)``), and
those hooks fire because the module still runs.

Schemes (``Family.scheme``):

- ``softmax_topk`` (Mixtral, Qwen2/3-MoE, OLMoE): the gate returns ``(logits (T, E), weights (T, K),
  indices (T, K))``; ``Routing.probs = softmax(logits)`` in float32.
- ``deepseek`` (DeepSeek-V3): same triple (group-limited sigmoid choice); ``Routing.probs`` are the sigmoid
  affinities normalised per token.
- ``switch`` (SwitchTransformers): the router runs on (B, L, D) and returns ``(capacity-masked one-hot,
  top-1 probability (B, L, 1), logits (B, L, E))``; every token's top-1 pair is emitted and the per-sequence
  capacity is left to the dispatch plan (``moekit.interop.capacity``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.interop.capacity import SequenceRouting
from moekit.interop.registry import SCHEMES, Family
from moekit.routing.base import Router, Routing, empty_routing, slot_major_pairs


class HFGateRouter(Router):
    """Routes with a transformers router module ``gate`` (kept as a submodule, weights untouched).

    Args:
        gate: the transformers router module (e.g. ``MixtralTopKRouter``).
        scheme: one of ``moekit.interop.registry.SCHEMES``.
        num_experts: E.
        k: experts per token.
    """

    def __init__(self, gate: nn.Module, scheme: str, num_experts: int, k: int) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if scheme == "switch" and k != 1:
            raise ValueError(f"k must be 1 for the switch scheme, got {k}")
        self.gate = gate
        self.scheme, self.num_experts, self.k = scheme, num_experts, k

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        if self.scheme == "switch":
            return self._route_switch(x, seq_ids)
        T = x.shape[0]
        if T == 0:
            return empty_routing(self.num_experts, x.device)
        logits, top_w, top_idx = self.gate(x)  # (T, E), (T, K), (T, K)
        logits = logits.reshape(T, self.num_experts).float()
        if self.scheme == "deepseek":
            scores = logits.sigmoid()  # (T, E)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            probs = logits.softmax(dim=-1)
        token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w.float())
        return Routing(token_idx, expert_idx, weight, T, self.num_experts, logits=logits, probs=probs)

    def _route_switch(self, x: Tensor, seq_ids: Tensor | None) -> SequenceRouting:
        T, D = x.shape
        E = self.num_experts
        if seq_ids is None:
            seq_ids = torch.zeros(T, dtype=torch.long, device=x.device)
        B = int(seq_ids[-1]) + 1 if T else 1
        L = T // B
        if B * L != T:
            raise ValueError(
                "switch routing needs whole sequences of equal length (a (B, L, D) input, no padding mask), "
                f"got {T} tokens in {B} sequences"
            )
        _, top_p, logits = self.gate(x.view(B, L, D))  # (B, L, E) kept one-hot, (B, L, 1), (B, L, E)
        logits = logits.reshape(T, E)
        # The router's own expert pick: argmax of its float32 softmax cast to the input dtype (ties included).
        picked = torch.softmax(logits, dim=-1, dtype=logits.dtype).to(x.dtype).argmax(dim=-1)  # (T,)
        token_idx, expert_idx, weight = slot_major_pairs(picked[:, None], top_p.reshape(T, 1).float())
        logits = logits.float()
        return SequenceRouting(
            token_idx,
            expert_idx,
            weight,
            T,
            E,
            logits=logits,
            probs=logits.softmax(dim=-1),
            seq_ids=seq_ids,
        )

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, num_experts={self.num_experts}, k={self.k}"


def native_router(family: Family, gate: nn.Module) -> Router:
    """moekit's own router (``family.moekit_router``) computing what the transformers ``gate`` computes.

    It shares the gate's weight Parameter (and DeepSeek's ``e_score_correction_bias`` buffer), so both always
    hold the same values. Used to check the registry's claims and to run HF weights on moekit routing alone.
    """
    from moekit.routing.registry import build_router

    if family.scheme == "switch":
        weight = gate.classifier.weight
        if gate.classifier.bias is not None:
            raise ValueError(f"{family.name}: router_bias=True has no counterpart in moekit's SwitchRouter")
        k, options = 1, {}
    else:
        weight, k = gate.weight, int(gate.top_k)
        options = {}
        if family.moekit_router in ("qwen", "olmoe"):
            options = {"renormalize": bool(gate.norm_topk_prob)}
        elif family.scheme == "deepseek":
            options = {
                "n_group": int(gate.num_group),
                "topk_group": int(gate.topk_group),
                "routed_scaling_factor": float(gate.routed_scaling_factor),
                "norm_topk_prob": bool(gate.norm_topk_prob),
                "bias_update_speed": 0.0,  # transformers never moves the bias
            }
    E, D = weight.shape
    router = build_router(family.moekit_router, d_model=D, num_experts=E, k=k, **options)
    router.weight = weight
    if family.scheme == "deepseek":
        router.e_score_correction_bias = gate.e_score_correction_bias
    return router
