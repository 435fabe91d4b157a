"""Token-choice routers as plain per-token loops: the yardstick for the vectorised top-k, noisy top-k, Switch,
GShard, DeepSeek-V3 and top-p routers.

Each function takes the router (for its parameters and settings, read only: nothing is recorded or updated)
and the real tokens x (T, D), and returns the `Routing` the router should produce: for each token, its scores
one dot product at a time, its experts picked with Python's ``sorted``, its weights from scalar arithmetic.
Pairs come out slot-major like the routers'. Weights and losses stay differentiable, so gradients can be
compared too. Randomness is an explicit argument (the draws the router takes from its generator), so a test
can hand both sides the same noise. Meant for tiny sizes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.routing.base import Routing, router_dtype
from moekit.routing.deepseek import DeepSeekRouter
from moekit.routing.gshard import GShardRouter
from moekit.routing.noisy import NoisyTopKRouter
from moekit.routing.switch import SwitchRouter
from moekit.routing.topk import TopKRouter
from moekit.routing.topp import TopPRouter

Choice = tuple[int, Tensor]  # (expert, weight) of one token


def _f(v: Tensor) -> float:
    """A scalar's value for comparisons and sorting (no autograd involved)."""
    return float(v.detach())


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def _token_logits(x_t: Tensor, weight: Tensor, bias: Tensor | None = None) -> list[Tensor]:
    """Logit of one token for each expert, one dot product at a time. x_t (D,), weight (E, D)."""
    return [_dot(x_t, weight[e]) + (0.0 if bias is None else bias[e]) for e in range(weight.shape[0])]


def _softmax(values: list[Tensor]) -> list[Tensor]:
    top = max(_f(v) for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [v / total for v in exps]


def _ranked(values: list[Tensor]) -> list[int]:
    """Indices of ``values``, largest first."""
    return sorted(range(len(values)), key=lambda i: -_f(values[i]))


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _cv_squared(values: list[Tensor]) -> Tensor:
    """Population variance over squared mean (+1e-10) of a list of scalars, as in Shazeer et al.'s code."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    return var / (mean**2 + 1e-10)


def _slot_major(choices: list[list[Choice]]) -> list[tuple[int, int, Tensor]]:
    """Per-token ordered (expert, weight) choices -> pairs: every token's first choice, then second, ..."""
    pairs = []
    for slot in range(max((len(c) for c in choices), default=0)):
        for t, chosen in enumerate(choices):
            if slot < len(chosen):
                pairs.append((t, chosen[slot][0], chosen[slot][1]))
    return pairs


def _routing(
    choices: list[list[Choice]],
    E: int,
    x: Tensor,
    logits: list[list[Tensor]],
    probs: list[list[Tensor]],
) -> Routing:
    """Routing from per-token choices (best first) and per-token rows of logits and probabilities."""
    T, device, dtype = len(choices), x.device, router_dtype(x)
    pairs = _slot_major(choices)
    token_idx = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
    expert_idx = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
    weight = torch.stack([p[2] for p in pairs]) if pairs else torch.empty(0, dtype=dtype, device=device)
    logit_t = torch.stack([torch.stack(row) for row in logits]) if T else torch.empty(0, E, dtype=dtype)
    prob_t = torch.stack([torch.stack(row) for row in probs]) if T else torch.empty(0, E, dtype=dtype)
    return Routing(token_idx, expert_idx, weight, T, E, logits=logit_t, probs=prob_t)


# ------------------------------------------------------------------------------------------ top-k
def reference_topk(router: TopKRouter, x: Tensor) -> Routing:
    """Softmax then top-k (optionally renormalised), or top-k logits then softmax over those k."""
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    bias = None if router.bias is None else router.bias.to(dtype)
    choices, logits, probs = [], [], []
    for t in range(x.shape[0]):
        z = _token_logits(x[t].to(dtype), weight, bias)
        p = _softmax(z)
        top = _ranked(z)[: router.k]
        if router.order == "topk_then_softmax":
            w = _softmax([z[e] for e in top])
        elif router.renormalize:
            kept = sum(p[e] for e in top)
            w = [p[e] / kept for e in top]
        else:
            w = [p[e] for e in top]
        choices.append(list(zip(top, w, strict=True)))
        logits.append(z)
        probs.append(p)
    return _routing(choices, router.num_experts, x, logits, probs)


# ------------------------------------------------------------------------------------------ noisy top-k
def reference_noisy_topk(router: NoisyTopKRouter, x: Tensor, noise: Tensor | None = None) -> Routing:
    """Shazeer et al. noisy top-k, one token at a time, with the paper's formulas.

    ``noise`` (T, E): the standard normal draws eps, needed when the router is training with noise.
    The load estimator uses ``kth_excluding`` literally: the k-th largest of the *other* experts' H.
    """
    T, E, k = x.shape[0], router.num_experts, router.k
    noisy = router.training and router.noise
    if noisy and (noise is None or noise.shape != (T, E)):
        raise ValueError(f"noise must be a ({T}, {E}) tensor of N(0, 1) draws when the router trains with noise")
    dtype = router_dtype(x)
    w_gate, w_noise = router.weight.to(dtype), router.noise_weight.to(dtype)
    choices, logits, probs, gate_rows, load_rows = [], [], [], [], []
    for t in range(T):
        x_t = x[t].to(dtype)
        clean = _token_logits(x_t, w_gate)
        if noisy:
            scale = [torch.nn.functional.softplus(v) + router.noise_epsilon for v in _token_logits(x_t, w_noise)]
            h = [clean[e] + noise[t, e].to(dtype) * scale[e] for e in range(E)]
        else:
            h = clean
        top = _ranked(h)[:k]
        w = _softmax([h[e] for e in top])
        choices.append(list(zip(top, w, strict=True)))
        gates = {e: g for e, g in zip(top, w, strict=True)}
        gate_rows.append([gates.get(e, torch.zeros((), dtype=dtype)) for e in range(E)])
        if noisy and k < E:
            row = []
            for i in range(E):
                others = sorted((h[j] for j in range(E) if j != i), key=lambda v: -_f(v))
                row.append(_normal_cdf((clean[i] - others[k - 1]) / scale[i]))
            load_rows.append(row)
        else:
            load_rows.append([torch.tensor(float(e in top), dtype=dtype) for e in range(E)])
        logits.append(h)
        probs.append(_softmax(h))
    routing = _routing(choices, E, x, logits, probs)
    if T:
        routing.losses["importance"] = _cv_squared([sum(row[e] for row in gate_rows) for e in range(E)])
        routing.losses["load"] = _cv_squared([sum(row[e] for row in load_rows) for e in range(E)])
    return routing


# ------------------------------------------------------------------------------------------ Switch
def reference_switch(router: SwitchRouter, x: Tensor, jitter_uniform: Tensor | None = None) -> Routing:
    """Top-1 of the softmax, weight = that probability. ``jitter_uniform`` (T, D): the U(0, 1) draws the
    router turns into its multiplier ``1 - jitter + 2 jitter u`` (needed when training with jitter)."""
    T, D = x.shape
    jittered = router.training and router.jitter > 0
    if jittered and (jitter_uniform is None or jitter_uniform.shape != (T, D)):
        raise ValueError(f"jitter_uniform must be a ({T}, {D}) tensor of U(0, 1) draws when training with jitter")
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    choices, logits, probs = [], [], []
    for t in range(T):
        x_t = x[t].to(dtype)
        if jittered:
            j = router.jitter
            x_t = torch.stack([x_t[d] * (1.0 - j + 2.0 * j * jitter_uniform[t, d]) for d in range(D)])
        z = _token_logits(x_t, weight)
        p = _softmax(z)
        best = _ranked(p)[0]
        choices.append([(best, p[best])])
        logits.append(z)
        probs.append(p)
    return _routing(choices, router.num_experts, x, logits, probs)


# ------------------------------------------------------------------------------------------ GShard
def reference_gshard(router: GShardRouter, x: Tensor, uniform: Tensor | None = None) -> Routing:
    """Top-2 normalised over the two; the second kept if ``g2 >= threshold`` and, in training with random
    routing, if ``2 g2 > uniform[t]``. ``uniform`` (T,): the U(0, 1) draws (needed in that case)."""
    T = x.shape[0]
    random = router.training and router.random_routing
    if random and (uniform is None or uniform.shape != (T,)):
        raise ValueError(f"uniform must be a ({T},) tensor of U(0, 1) draws when training with random routing")
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    choices, logits, probs = [], [], []
    for t in range(T):
        z = _token_logits(x[t].to(dtype), weight)
        p = _softmax(z)
        e1, e2 = _ranked(p)[:2]
        g1, g2 = p[e1] / (p[e1] + p[e2]), p[e2] / (p[e1] + p[e2])
        keep = _f(g2) >= router.second_expert_threshold
        if random:
            keep = keep and 2.0 * _f(g2) > float(uniform[t])
        choices.append([(e1, g1), (e2, g2)] if keep else [(e1, g1)])
        logits.append(z)
        probs.append(p)
    routing = _routing(choices, router.num_experts, x, logits, probs)
    routing.stats["second_expert_share"] = sum(len(c) == 2 for c in choices) / T if T else 0.0
    return routing


# ------------------------------------------------------------------------------------------ DeepSeek-V3
def reference_deepseek(router: DeepSeekRouter, x: Tensor, seq_ids: Tensor | None = None) -> Routing:
    """Sigmoid scores; biased scores rank groups (sum of each group's best two) and experts inside the kept
    groups; unbiased scores weigh. With ``seq_aux_loss``, the sequence-wise loss, one sequence at a time."""
    T, E, k = x.shape[0], router.num_experts, router.k
    G, size = router.n_group, router.num_experts // router.n_group
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    bias = [float(b) for b in router.e_score_correction_bias.to(dtype)]
    choices, logits, probs = [], [], []
    for t in range(T):
        z = _token_logits(x[t].to(dtype), weight)
        s = [torch.sigmoid(v) for v in z]
        biased = [_f(s[e]) + bias[e] for e in range(E)]
        group_score = []
        for g in range(G):
            members = sorted((biased[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_score.append(sum(members[:2]))
        kept_groups = sorted(range(G), key=lambda g: -group_score[g])[: router.topk_group]
        candidates = [e for g in kept_groups for e in range(g * size, (g + 1) * size)]
        top = sorted(candidates, key=lambda e: -biased[e])[:k]
        w = [s[e] for e in top]
        if router.norm_topk_prob:
            total = sum(w) + 1e-20
            w = [v / total for v in w]
        w = [v * router.routed_scaling_factor for v in w]
        choices.append(list(zip(top, w, strict=True)))
        logits.append(z)
        total_s = sum(s)
        probs.append([v / total_s for v in s])
    routing = _routing(choices, E, x, logits, probs)
    if router.seq_aux_loss and T:
        seqs = [0] * T if seq_ids is None else [int(v) for v in seq_ids]
        per_seq = []
        for seq in sorted(set(seqs)):
            members = [t for t in range(T) if seqs[t] == seq]
            loss = 0.0
            for i in range(E):
                chosen = sum(1 for t in members if i in [e for e, _ in choices[t]])
                f_i = E / (k * len(members)) * chosen
                P_i = sum(probs[t][i] for t in members) / len(members)
                loss = loss + f_i * P_i
            per_seq.append(loss)
        routing.losses["seq_balance"] = sum(per_seq) / len(per_seq)
    return routing


# ------------------------------------------------------------------------------------------ top-p
def reference_topp(router: TopPRouter, x: Tensor) -> Routing:
    """Walk each token's experts from the most probable, adding up probability until it reaches p."""
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    choices, logits, probs = [], [], []
    for t in range(x.shape[0]):
        z = _token_logits(x[t].to(dtype), weight)
        p = _softmax(z)
        top, mass = [], 0.0
        for e in _ranked(p):
            if len(top) >= router.max_k or (len(top) >= router.min_k and mass >= router.p):
                break
            top.append(e)
            mass += _f(p[e])
        w = [p[e] for e in top]
        if router.renormalize:
            kept = sum(w)
            w = [v / kept for v in w]
        choices.append(list(zip(top, w, strict=True)))
        logits.append(z)
        probs.append(p)
    routing = _routing(choices, router.num_experts, x, logits, probs)
    routing.stats["mean_experts_per_token"] = sum(len(c) for c in choices) / len(choices) if choices else 0.0
    return routing
