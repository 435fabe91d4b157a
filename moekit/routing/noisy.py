"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer").

In training the gate adds learned, input-dependent Gaussian noise before picking the top k:

    H(x)_i = (x W_g)_i + eps_i * (softplus((x W_noise)_i) + noise_epsilon),   eps ~ N(0, 1)
    G(x) = softmax(KeepTopK(H(x), k))

``noise_epsilon`` is the floor on the noise scale from the paper's released code (tensor2tensor), so the
smooth load estimator below never divides by zero. In eval (or with ``noise=False``) H = x W_g.

Two balancing losses go to ``Routing.losses`` (unweighted; the layer applies ``loss_weights``):

- ``"importance"``: CV^2 of the per-expert sum of gate values, ``Importance(X) = sum_x G(x)``.
- ``"load"``: CV^2 of the smooth load ``Load(X)_i = sum_x P(x, i)`` with
  ``P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / noise_scale_i)``, the probability that expert i
  stays in the top k if only its own noise were drawn again (Phi: standard normal CDF). It is differentiable
  w.r.t. ``W_g`` and ``W_noise``. Without noise (eval, ``noise=False``) or when k = E the estimator is
  undefined or constant, so ``"load"`` is the CV^2 of the hard counts (tokens per expert) and carries no
  gradient, as in the paper's code.

Noise is drawn as one (T, E) block ``torch.randn((T, E), generator=generator)`` in the router dtype, row t for
token t, on the generator's device (so a CPU generator also drives a CUDA router). Pass a seeded
``torch.Generator`` for reproducible noise.

``Routing.logits`` holds H (the logits actually routed on; equal to x W_g in eval) and ``Routing.probs`` the
softmax of H over all E experts.

Init: ``W_g`` normal with std 1/sqrt(D) (like the other moekit routers, so an untrained router routes by input
in eval); ``W_noise`` zeros, as in the paper (noise scale softplus(0) + noise_epsilon at the start).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moekit.losses import cv_squared, importance_loss
from moekit.routing.base import Router, Routing, empty_routing, fp32_logits, slot_major_pairs
from moekit.routing.topk import check_router_sizes


def prob_in_top_k(clean: Tensor, noisy: Tensor, noise_scale: Tensor, top_values: Tensor, k: int) -> Tensor:
    """(T, E) smooth probability that each expert is in its token's top k (Shazeer et al. 2017, eq. 9).

    ``clean`` (T, E) = x W_g; ``noisy`` (T, E) = H; ``noise_scale`` (T, E) > 0; ``top_values`` (T, k+1) the
    k+1 largest entries of each row of H, descending (needs k < E).
    kth_excluding(H, k, i) is the (k+1)-th largest of H when i is itself in the top k, else the k-th largest.
    """
    threshold_if_in = top_values[:, k : k + 1]  # (T, 1) (k+1)-th largest
    threshold_if_out = top_values[:, k - 1 : k]  # (T, 1) k-th largest
    is_in = noisy > threshold_if_in  # (T, E)
    prob_if_in = torch.special.ndtr((clean - threshold_if_in) / noise_scale)
    prob_if_out = torch.special.ndtr((clean - threshold_if_out) / noise_scale)
    return torch.where(is_in, prob_if_in, prob_if_out)


class NoisyTopKRouter(Router):
    """Shazeer et al. noisy top-k gate: top-k of noisy logits, softmax over the kept k.

    Args:
        d_model: input width D.
        num_experts: E.
        k: experts per token (1 <= k <= E).
        noise: add the learned noise in training (False: plain top-k of x W_g, softmax over the kept k).
        noise_epsilon: floor added to the noise scale, > 0.
        generator: optional ``torch.Generator`` the training noise is drawn from (reproducible runs/tests);
            None uses the global RNG of the input's device. Settable later as ``router.generator``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        noise: bool = True,
        noise_epsilon: float = 1e-2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, k)
        if not isinstance(noise, bool):
            raise TypeError(f"noise must be a bool, got {type(noise).__name__}")
        if isinstance(noise_epsilon, bool) or not isinstance(noise_epsilon, (int, float)):
            raise TypeError(f"noise_epsilon must be a number, got {type(noise_epsilon).__name__}")
        if not (noise_epsilon > 0 and math.isfinite(noise_epsilon)):
            raise ValueError(f"noise_epsilon must be a finite number > 0, got {noise_epsilon}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.noise, self.noise_epsilon = noise, float(noise_epsilon)
        self.generator = generator
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, D) W_g, like nn.Linear
        # (E, D) W_noise, zero at init as in the paper: the noise scale starts at softplus(0) + noise_epsilon.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_model))

    def standard_normal(self, like: Tensor) -> Tensor:
        """Noise eps ~ N(0, 1) with the shape, dtype and device of ``like``, drawn from ``self.generator``."""
        device = self.generator.device if self.generator is not None else like.device
        eps = torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=device)
        return eps.to(like.device)

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T, E, k = x.shape[0], self.num_experts, self.k
        if T == 0:
            routing = empty_routing(E, x.device)
            routing.losses["importance"] = torch.zeros((), device=x.device)
            routing.losses["load"] = torch.zeros((), device=x.device)
            return routing
        clean = fp32_logits(x, self.weight)  # (T, E) x W_g
        noisy = self.training and self.noise
        if noisy:
            noise_scale = F.softplus(fp32_logits(x, self.noise_weight)) + self.noise_epsilon  # (T, E) > 0
            logits = clean + self.standard_normal(clean) * noise_scale  # (T, E) H
        else:
            logits = clean
        top_values, top_idx = logits.topk(min(k + 1, E), dim=-1)  # (T, k+1), one extra for the load estimator
        top_w = top_values[:, :k].softmax(dim=-1)  # (T, K) softmax over the kept k
        top_idx = top_idx[:, :k]
        gates = torch.zeros_like(logits).scatter(1, top_idx, top_w)  # (T, E), zero off the top k

        if noisy and k < E:
            load = prob_in_top_k(clean, logits, noise_scale, top_values, k).sum(dim=0)  # (E,) smooth
        else:
            load = torch.bincount(top_idx.reshape(-1), minlength=E).to(logits.dtype)  # (E,) hard, no gradient
        token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w)
        routing = Routing(token_idx, expert_idx, weight, T, E, logits=logits, probs=logits.softmax(dim=-1))
        routing.losses["importance"] = importance_loss(gates)
        routing.losses["load"] = cv_squared(load)
        return routing

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, noise={self.noise}, "
            f"noise_epsilon={self.noise_epsilon}"
        )
