"""The MoE layer as a plain per-token loop: slow, obvious, and the yardstick for every fast path.

It consumes the same `Routing` the fast layer gets from its router, then does everything else one token and one
pair at a time: capacity bookkeeping with per-expert counters, each expert applied to a single token, weighted sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.layer import MoELayer
from moekit.output import MoEOutput
from moekit.routing.base import Routing


def kept_pairs(routing: Routing, capacity: int | None, drop_policy: str) -> list[int]:
    """Indices of the pairs that survive capacity, by walking pairs in priority order with counters."""
    P = routing.num_pairs
    if capacity is None:
        return list(range(P))
    if drop_policy == "probability":
        priority = routing.pair_priority().tolist()
        order = sorted(range(P), key=lambda p: -priority[p])  # sorted() is stable: ties keep pair order
    else:
        order = list(range(P))
    used = [0] * routing.num_experts
    kept = []
    for p in order:
        e = int(routing.expert_idx[p])
        if used[e] < capacity:
            used[e] += 1
            kept.append(p)
    return sorted(kept)


def reference_forward(
    layer: MoELayer, x: Tensor, mask: Tensor | None = None, token_ids: Tensor | None = None
) -> MoEOutput:
    """Same contract as ``layer(x, mask, token_ids)``, computed token by token."""
    D = layer.d_model
    lead = x.shape[:-1]
    x_flat = x.reshape(-1, D)
    positions = list(range(x_flat.shape[0]))
    if mask is not None:
        flat_mask = mask.reshape(-1).tolist()
        positions = [i for i in positions if flat_mask[i]]
    x_real = x_flat[positions] if positions else x_flat[:0]
    seq_len = lead[-1] if len(lead) >= 2 else max(x_flat.shape[0], 1)
    seq_ids = torch.tensor([i // seq_len for i in positions], dtype=torch.long, device=x.device)
    ids = None
    if token_ids is not None:
        flat_ids = token_ids.reshape(-1)
        ids = flat_ids[positions] if positions else flat_ids[:0]

    routing = layer.router(x_real, token_ids=ids, seq_ids=seq_ids)
    T, E = routing.num_tokens, routing.num_experts

    cf = layer.capacity_factor if layer.training else layer.eval_capacity_factor
    capacity = None
    if cf is not None:
        from moekit.dispatch.plan import expert_capacity

        capacity = expert_capacity(routing.num_pairs, E, cf, layer.min_capacity)
    kept = set(kept_pairs(routing, capacity, layer.drop_policy))

    rows = []
    for t in range(T):
        acc = x_real.new_zeros(D)
        for p in range(routing.num_pairs):
            if int(routing.token_idx[p]) != t or p not in kept:
                continue
            e = int(routing.expert_idx[p])
            y = layer.experts.expert_forward(e, x_real[t : t + 1])[0]
            acc = acc + routing.weight[p].to(y.dtype) * y
        if layer.shared is not None:
            acc = acc + layer.shared(x_real[t : t + 1])[0]
        rows.append(acc.to(x.dtype))

    out_rows = [x_flat.new_zeros(D) for _ in range(x_flat.shape[0])]
    for j, i in enumerate(positions):
        out_rows[i] = rows[j]
    output = torch.stack(out_rows).reshape(x.shape) if out_rows else x.new_zeros(x.shape)

    losses: dict[str, Tensor] = {}
    counts = [0] * E
    for p in range(routing.num_pairs):
        counts[int(routing.expert_idx[p])] += 1
    if routing.probs is not None and T and routing.num_pairs:
        total = routing.probs.new_zeros(())
        for e in range(E):
            mean_p = sum(routing.probs[t, e] for t in range(T)) / T
            total = total + (counts[e] / routing.num_pairs) * mean_p
        losses["load_balance"] = E * total
    if routing.logits is not None and T:
        losses["z_loss"] = sum(torch.logsumexp(routing.logits[t], dim=0) ** 2 for t in range(T)) / T
    losses.update(routing.losses)
    dropped = [0] * E
    for p in range(routing.num_pairs):
        if p not in kept:
            dropped[int(routing.expert_idx[p])] += 1
    stats = {
        "tokens_per_expert": torch.tensor(counts),
        "dropped_per_expert": torch.tensor(dropped),
        "num_tokens": torch.tensor(T),
    }
    return MoEOutput(output=output, losses=losses, stats=stats, router_logits=routing.logits)
