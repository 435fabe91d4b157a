"""Auxiliary losses of MoE routing. All take real (unmasked) tokens only, so they are padding-aware.

Shapes: ``T`` tokens, ``E`` experts, ``P`` token-expert pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Default weight of each loss in ``MoEOutput.aux_loss``; losses not listed get 0 (reported, not optimised).
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "load_balance": 1e-2,
    "z_loss": 1e-3,
    "importance": 1e-2,
    "load": 1e-2,
    "diversity": 1e-2,
    "seq_balance": 1e-4,
}


def load_balance_loss(probs: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """Switch loss ``E * sum_i f_i * P_i``; 1.0 when perfectly balanced, E when collapsed on one expert.

    ``probs`` (T, E) router probabilities; ``tokens_per_expert`` (E,) pairs routed to each expert (before
    capacity drops). ``f_i`` is expert i's share of all pairs, so the value does not grow with k. Hugging Face's
    ``load_balancing_loss_func`` normalises by tokens instead of pairs, i.e. it is k times this for top-k.
    """
    E = probs.shape[-1]
    P = tokens_per_expert.sum()
    if probs.shape[0] == 0 or int(P) == 0:
        return probs.new_zeros(())
    f = tokens_per_expert.to(probs.dtype) / P  # (E,)
    p_mean = probs.mean(dim=0)  # (E,)
    return E * (f * p_mean).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``. logits (T, E)."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance) of a (E,) vector."""
    values = values.to(torch.promote_types(values.dtype, torch.float32))  # counts -> float32, float64 kept
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean().square() + eps)


def importance_loss(gates: Tensor) -> Tensor:
    """Shazeer et al. 2017: CV^2 of the per-expert sum of gate values. gates (T, E), zeros where not routed."""
    return cv_squared(gates.sum(dim=0))
