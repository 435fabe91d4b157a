"""Batch-level routers as plain loops: the yardstick for the vectorised expert-choice, hash, Sinkhorn,
BASE and top-any routers.

Each function takes the router (for its parameters and settings, read only: nothing is recorded) and the
real tokens, and returns the `Routing` the router should produce, computed one token, one expert or one
scalar at a time. Weights stay differentiable, so gradients can be compared too. Meant for tiny sizes.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import torch
from torch import Tensor

from moekit.routing.base import Routing, router_dtype
from moekit.routing.base_layer import BaseRouter
from moekit.routing.dynmoe import TopAnyRouter
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.hash import HashRouter
from moekit.routing.sinkhorn import SinkhornRouter

#: Largest number of candidate assignments ``reference_base`` enumerates.
MAX_BRUTE_FORCE = 10**6


def pair_weights(routing: Routing) -> dict[tuple[int, int], Tensor]:
    """{(token, expert): weight} of a routing, for comparing routings pair by pair; duplicates raise."""
    out: dict[tuple[int, int], Tensor] = {}
    for p, (t, e) in enumerate(zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), strict=True)):
        if (t, e) in out:
            raise ValueError(f"routing has the pair (token {t}, expert {e}) twice")
        out[(t, e)] = routing.weight[p]
    return out


def _f(v: Tensor) -> float:
    """A scalar's value for comparisons (no autograd involved)."""
    return float(v.detach())


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def _token_logits(x_t: Tensor, weight: Tensor) -> list[Tensor]:
    """Logit of one token for each expert, one dot product at a time. x_t (D,), weight (E, D)."""
    return [_dot(x_t, weight[e]) for e in range(weight.shape[0])]


def _softmax(values: list[Tensor]) -> list[Tensor]:
    top = max(_f(v) for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [v / total for v in exps]


def _routing(
    pairs: list[tuple[int, int, Tensor]], T: int, E: int, x: Tensor, logits: list[list[Tensor]] | None = None
) -> Routing:
    """Routing from (token, expert, weight) triples in pair order; logits rows (T x E) give logits/probs."""
    device, dtype = x.device, router_dtype(x)
    token_idx = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)
    expert_idx = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
    weight = torch.stack([p[2].to(dtype) for p in pairs]) if pairs else torch.empty(0, dtype=dtype, device=device)
    logit_t = probs = None
    if logits is not None:
        logit_t = torch.stack([torch.stack(row) for row in logits]).to(dtype)
        probs = torch.stack([torch.stack(_softmax(row)) for row in logits]).to(dtype)
    return Routing(token_idx, expert_idx, weight, T, E, logits=logit_t, probs=probs)


def _slot_major(choices: list[list[tuple[int, Tensor]]]) -> list[tuple[int, int, Tensor]]:
    """Per-token ordered (expert, weight) choices -> pairs: every token's first choice, then second, ..."""
    pairs = []
    for slot in range(max((len(c) for c in choices), default=0)):
        for t, chosen in enumerate(choices):
            if slot < len(chosen):
                pairs.append((t, chosen[slot][0], chosen[slot][1]))
    return pairs


# ------------------------------------------------------------------------------------------ expert choice
def reference_expert_choice(router: ExpertChoiceRouter, x: Tensor) -> Routing:
    """Each expert sorts all tokens by score in Python and takes the first C; or token top-k in eval."""
    T, E, k = x.shape[0], router.num_experts, router.k
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    logits = [_token_logits(x[t].to(dtype), weight) for t in range(T)]
    scores = [_softmax(row) for row in logits]  # T lists of E scalars
    if not router.training and router.inference_mode == "topk":
        choices = []
        for t in range(T):
            ranked = sorted(range(E), key=lambda e, t=t: -_f(scores[t][e]))
            choices.append([(e, scores[t][e]) for e in ranked[:k]])
        routing = _routing(_slot_major(choices), T, E, x, logits)
        routing.stats["unrouted_share"] = 0.0
        return routing
    # The decimal the user wrote, in exact arithmetic (1.1 * 100 / 10 is 11, not the float 11.000000000000002).
    capacity = min(T, math.ceil(Fraction(repr(float(router.capacity_factor))) * T * k / E))
    pairs = []
    for e in range(E):
        ranked = sorted(range(T), key=lambda t, e=e: -_f(scores[t][e]))
        for t in ranked[:capacity]:
            pairs.append((t, e, scores[t][e]))
    routing = _routing(pairs, T, E, x, logits)
    taken = {t for t, _, _ in pairs}
    routing.stats["unrouted_share"] = (T - len(taken)) / T if T else 0.0
    return routing


# ------------------------------------------------------------------------------------------ hash
def _mix32(h: int) -> int:
    h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    return (h >> 16) ^ h


def reference_hash(router: HashRouter, x: Tensor, token_ids: Tensor) -> Routing:
    """One token at a time: the table row (rebuilt by sorting each row of the seeded uniforms in Python) or
    the integer hash of (id, expert) computed with Python ints; the k smallest win."""
    T, E, k = x.shape[0], router.num_experts, router.k
    uniforms = None
    if router.vocab_size is not None:
        gen = torch.Generator().manual_seed(router.seed)
        uniforms = torch.rand(router.vocab_size, E, generator=gen).tolist()
    mask = 0xFFFFFFFF
    choices = []
    for t in range(T):
        token = int(token_ids[t])
        if uniforms is not None:
            keys = [(uniforms[token][e], e) for e in range(E)]
        else:
            id_key = _mix32((token & mask) ^ _mix32(token >> 32))
            seed_key = _mix32(router.seed & mask)
            keys = [(_mix32(id_key ^ _mix32((seed_key + e) & mask)), e) for e in range(E)]
        experts = [e for _, e in sorted(keys)[:k]]
        choices.append([(e, torch.tensor(1.0 / k, dtype=router_dtype(x))) for e in experts])
    return _routing(_slot_major(choices), T, E, x)


# ------------------------------------------------------------------------------------------ sinkhorn
def reference_sinkhorn_matrix(logits: list[list[float]], n_iters: int, eps: float | None = None) -> list[list[float]]:
    """Sinkhorn on exp(logits) with Python floats, row by row then column by column.

    Rows are scaled to sum to 1, columns to T/E; same iteration and early stop as ``sinkhorn_log``.
    """
    T, E = len(logits), len(logits[0])
    top = max(max(row) for row in logits)  # a global shift cancels in the normalisation
    K = [[math.exp(v - top) for v in row] for row in logits]
    u, v = [1.0] * T, [1.0] * E
    for _ in range(n_iters):
        for t in range(T):
            u[t] = 1.0 / sum(K[t][e] * v[e] for e in range(E))
        for e in range(E):
            v[e] = (T / E) / sum(K[t][e] * u[t] for t in range(T))
        if eps is not None:
            rows = [sum(u[t] * K[t][e] * v[e] for e in range(E)) for t in range(T)]
            if max(abs(r - 1.0) for r in rows) < eps:
                break
    return [[u[t] * K[t][e] * v[e] for e in range(E)] for t in range(T)]


def reference_sinkhorn(router: SinkhornRouter, x: Tensor) -> Routing:
    """Top-k per token of the loop-normalised matrix (training) or of the logits (eval); same gate."""
    T, E, k = x.shape[0], router.num_experts, router.k
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    logits = [_token_logits(x[t].to(dtype), weight) for t in range(T)]
    if router.training:
        ranking = reference_sinkhorn_matrix([[_f(v) for v in row] for row in logits], router.n_iters, router.eps)
    else:
        ranking = [[_f(v) for v in row] for row in logits]
    choices = []
    for t in range(T):
        gates = [torch.sigmoid(v) for v in logits[t]] if k == 1 else _softmax(logits[t])
        ranked = sorted(range(E), key=lambda e, t=t: -ranking[t][e])
        choices.append([(e, gates[e]) for e in ranked[:k]])
    return _routing(_slot_major(choices), T, E, x, logits)


# ------------------------------------------------------------------------------------------ BASE
def reference_base(router: BaseRouter, x: Tensor) -> Routing:
    """Training: the best balanced assignment, enumerating all E**T assignments (tiny T); eval: top-1."""
    T, E = x.shape[0], router.num_experts
    dtype = router_dtype(x)
    weight = router.weight.to(dtype)
    logits = [_token_logits(x[t].to(dtype), weight) for t in range(T)]
    aff = [[_f(v) for v in row] for row in logits]
    if router.training:
        if E**T > MAX_BRUTE_FORCE:
            raise ValueError(f"reference_base enumerates E**T = {E**T} assignments, more than {MAX_BRUTE_FORCE}")
        if router.capacity is None:
            lo, hi = T // E, -(-T // E)
        else:
            lo, hi = 0, router.capacity
        best, best_total = None, -math.inf
        for assignment in itertools.product(range(E), repeat=T):
            counts = [assignment.count(e) for e in range(E)]
            if min(counts) < lo or max(counts) > hi:
                continue
            total = sum(aff[t][assignment[t]] for t in range(T))
            if total > best_total:
                best, best_total = assignment, total
        experts = list(best)
    else:
        experts = [max(range(E), key=lambda e, t=t: aff[t][e]) for t in range(T)]
    pairs = [(t, experts[t], torch.sigmoid(logits[t][experts[t]])) for t in range(T)]
    return _routing(pairs, T, E, x, logits)


# ------------------------------------------------------------------------------------------ DynMoE top-any
def reference_top_any(router: TopAnyRouter, x: Tensor) -> Routing:
    """Per token, per expert threshold check; top-1 fallback; masked softmax times straight-through gate."""
    T, E = x.shape[0], router.num_experts
    dtype = router_dtype(x)
    gate_vectors = router.gate_vectors.to(dtype)
    thresholds = router.thresholds.to(dtype)
    w_norm = [torch.sqrt(_dot(gate_vectors[e], gate_vectors[e])).clamp_min(1e-12) for e in range(E)]
    choices, scores, fallbacks = [], [], 0
    for t in range(T):
        x_t = x[t].to(dtype)
        x_norm = torch.sqrt(_dot(x_t, x_t)).clamp_min(1e-12)
        s = [_dot(x_t, gate_vectors[e]) / (x_norm * w_norm[e]) for e in range(E)]
        margin = [torch.sigmoid(s[e]) - torch.sigmoid(thresholds[e]) for e in range(E)]
        chosen = [e for e in range(E) if _f(margin[e]) > 0]
        if not chosen:
            chosen = [max(range(E), key=lambda e, s=s: _f(s[e]))]
            fallbacks += 1
        soft = _softmax([s[e] for e in chosen])
        weighted = [(e, p * (1.0 + (margin[e] - margin[e].detach()))) for e, p in zip(chosen, soft, strict=True)]
        choices.append(sorted(weighted, key=lambda pair, s=s: -_f(s[pair[0]])))
        scores.append(s)
    routing = _routing(_slot_major(choices), T, E, x, scores if T else None)
    total = sum(
        (_dot(gate_vectors[i], gate_vectors[j]) - (1.0 if i == j else 0.0)) ** 2 for i in range(E) for j in range(E)
    )
    routing.losses["diversity"] = torch.sqrt(total)
    routing.stats["fallback_share"] = fallbacks / T if T else 0.0
    return routing
