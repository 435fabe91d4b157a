"""Expert-parallel MoE layer: experts sharded over an EP process group, router replicated.

Per forward, on each of the ``W`` ranks of the EP group (each with its own local batch):

1. route the local tokens (replicated router) and decide which pairs are kept (dropless, or capacity);
2. send each expert's row count to the rank owning it (an all-to-all of E integers per rank; with global
   capacity, per slot, and the owner sends back how many rows of each block survive), so every rank knows
   the split sizes of its all-to-alls;
3. ``all_to_all`` the kept rows to the ranks owning their experts (uneven splits), regroup them by local
   expert, run the local experts (one grouped GEMM per projection), ``all_to_all`` the results back, and
   scatter-add them with the combine weights;
4. auxiliary losses over the global batch: one differentiable all-reduce (over all router replicas, i.e.
   the whole world: EP x DP) of ``[sum_t p_t (E,), sum_t lse_t^2, pairs per expert (E,), tokens]``.

Semantics. "The global batch" is the ranks' batches concatenated in rank order (for the expert computation
and capacity: the ranks of the EP group; for the auxiliary losses: all ranks).

- Dropless: outputs equal the single-process layer on the global batch.
- ``capacity_scope="global"`` (default): ``C = ceil(cf * P_global / E)`` per expert, and drops are decided in
  the order the single-process layer uses on the global batch (slot-major, then rank, then token for
  ``drop_policy="position"``; router priority, ties broken by that order, for ``"probability"``). Outputs
  equal the single-process layer on the global batch, whatever the EP size. "position" needs only the
  per-(slot, expert) counts at each expert's owner; "probability" sends (global position, priority) of every
  pair to its expert's owner (16 bytes per pair, next to ``d_model * dtype_bytes`` for the row itself), and
  a keep flag back.
- ``capacity_scope="local"`` (GShard's per-group capacity): each rank applies ``plan_capacity`` to its own
  batch (C from its own pair count). Outputs equal the single-process layer run on each rank's batch apart.
- The load-balance and z losses are over the global batch in both scopes; router-specific ``routing.losses``
  stay local, and so do ``stats`` (this rank's tokens).

Equivalence holds for per-token routers that emit slot-major pairs (every token-choice router in moekit);
batch-coupled routers (expert choice, BASE, Sinkhorn) run, but route each rank's batch on its own.

Gradients: with gradients of replicated parameters averaged over all ranks, and expert gradients summed over
their replicas and divided by the world size (``moekit.parallel.data_parallel.sync_gradients``), per-rank
losses "local mean + aux" give exactly the gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.dispatch.plan import DispatchPlan, expert_capacity, plan_capacity
from moekit.experts.grouped import GroupedFFN
from moekit.layer import MoELayer
from moekit.parallel.all_to_all import all_gather_rows, all_reduce_sum, all_to_all, all_to_all_nograd
from moekit.parallel.mesh import ParallelGroups, check_consistent, collective_guard, shard_range
from moekit.routing.base import Routing

CAPACITY_SCOPES = ("global", "local")


@dataclass
class _Exchange:
    """The split sizes of one forward's all-to-alls."""

    send: list[int]  # rows this rank sends to each rank of the EP group
    recv_blocks: Tensor  # (W, El) rows this rank receives from each source for each of its local experts


class ExpertParallelMoELayer(MoELayer):
    """An ``MoELayer`` whose ``GroupedFFN`` experts are sharded over ``group`` (see the module doc).

    Built from a full ``MoELayer`` that is identical on every rank (same seed): the router, shared experts and
    settings are taken over as they are; the experts are sliced to this rank's ``E / W`` experts (global
    indices ``[expert_start, expert_start + num_local_experts)``). ``num_experts`` stays the global E.

    Args:
        layer: the full layer (its router and shared experts are reused, not copied).
        group: the EP process group (default: the whole world).
        capacity_scope: ``"global"`` or ``"local"`` (see the module doc); only used with a capacity factor.
        replica_group: the group over which the router is replicated (default: the whole world). The
            load-balance and z losses are computed over its batch, and the load handed to the router's
            between-steps hook is summed over it, so every replica updates alike.
    """

    def __init__(
        self,
        layer: MoELayer,
        group: dist.ProcessGroup | None = None,
        capacity_scope: str = "global",
        replica_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(layer, MoELayer) or isinstance(layer, ExpertParallelMoELayer):
            raise TypeError(f"layer must be a (non-parallel) MoELayer, got {type(layer).__name__}")
        if not isinstance(layer.experts, GroupedFFN):
            raise TypeError("expert parallelism needs GroupedFFN experts (not a heterogeneous ExpertList)")
        if capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"capacity_scope must be one of {CAPACITY_SCOPES}, got {capacity_scope!r}")
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoELayer needs torch.distributed to be initialised")
        nn.Module.__init__(self)
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        # Every rank must build the same layer: compare first (one all-gather), then split the experts.
        check_consistent(_signature(layer, capacity_scope), group, what="MoE layer configuration")
        start, stop = shard_range(layer.num_experts, size, rank)  # raises when E % W != 0
        # Take over the layer's state: plain attributes, submodules but the experts, parameters, buffers.
        for key, value in vars(layer).items():
            if not key.startswith("_"):
                object.__setattr__(self, key, value)
        self.loss_weights = dict(layer.loss_weights)
        # Submodules in the layer's order (experts swapped for their slice in place), so that parameters()
        # and state_dict() list names in the single-process order: optimizer states line up by index.
        for name, module in layer._modules.items():
            self.add_module(name, _slice_experts(module, start, stop) if name == "experts" else module)
        for name, param in layer._parameters.items():
            self.register_parameter(name, param)
        for name, buf in layer._buffers.items():
            self.register_buffer(name, buf, persistent=name not in layer._non_persistent_buffers_set)
        self.ep_group, self.ep_size, self.ep_rank = group, size, rank
        self.replica_group = replica_group
        self.expert_start, self.num_local_experts = start, stop - start
        self.capacity_scope = capacity_scope
        self._exchange: _Exchange | None = None

    # ------------------------------------------------------------------ plan: counts exchange and drops
    def _plan(self, routing: Routing) -> DispatchPlan:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        routed = routing.tokens_per_expert()  # (E,)
        if cf is not None and self.capacity_scope == "local":
            plan = plan_capacity(routing, cf, self.drop_policy, self.min_capacity)
            self._exchange = self._exchange_counts(plan.counts)
            return plan
        capacity = None
        if cf is None:
            order = torch.argsort(routing.expert_idx, stable=True)  # (P,)
        else:
            if self.drop_policy == "position":
                keep, capacity, recv_blocks = self._position_keep(routing, cf)  # (P,) bool
            else:
                keep, capacity, recv_blocks = self._priority_keep(routing, cf)
            kept_pos = keep.nonzero().squeeze(1)
            order = kept_pos[torch.argsort(routing.expert_idx[kept_pos], stable=True)]  # (S,)
        counts = torch.bincount(routing.expert_idx[order], minlength=self.num_experts)
        if cf is None:
            self._exchange = self._exchange_counts(counts)
        else:  # the owners already know what they receive
            self._exchange = _Exchange(counts.view(self.ep_size, -1).sum(1).tolist(), recv_blocks)
        return DispatchPlan(
            pair_order=order,
            token_idx=routing.token_idx[order],
            weight=routing.weight[order],
            counts=counts,
            routed=routed,
            dropped=routed - counts,
            capacity=capacity,
        )

    def _exchange_counts(self, counts: Tensor) -> _Exchange:
        """Send each expert's row count (E,) to its owner: O(E) integers per rank."""
        W, El = self.ep_size, self.num_local_experts
        recv_blocks = all_to_all_nograd(counts, [El] * W, [El] * W, self.ep_group, "ep.counts").view(W, El)
        return _Exchange(counts.view(W, El).sum(1).tolist(), recv_blocks)

    def _slots_and_capacity(self, routing: Routing, cf: float) -> tuple[Tensor, int, int, Tensor]:
        """slot (P,) of each pair (k-th pair of its token), S slots, C, and (W, 2) [slots, pairs] per rank."""
        slot = _rank_within_groups(routing.token_idx, routing.num_tokens)
        P = routing.num_pairs
        head = torch.tensor([int(slot.max()) + 1 if P else 0, P], dtype=torch.long, device=slot.device)
        sp = all_gather_rows(head, self.ep_group, "ep.sizes")  # (W, 2): O(W) integers
        S = max(int(sp[:, 0].max()), 1)
        C = expert_capacity(int(sp[:, 1].sum()), self.num_experts, cf, self.min_capacity)
        return slot, S, C, sp

    def _position_keep(self, routing: Routing, cf: float) -> tuple[Tensor, int, Tensor]:
        """``drop_policy="position"`` on the global batch (slot-major, then rank, then token).

        Each owner gets every source's (slot, local expert) counts, works out how many pairs of each block
        survive, and sends the limits back: O(S * E) integers per rank."""
        E, W, El = self.num_experts, self.ep_size, self.num_local_experts
        slot, S, C, _ = self._slots_and_capacity(routing, cf)
        key = slot * E + routing.expert_idx  # (P,) (slot, expert)
        cnt = torch.bincount(key, minlength=S * E).view(S, W, El)  # my pairs per (slot, owner, local expert)
        to_owner = cnt.transpose(0, 1).reshape(-1)  # (W*S*El,) owner-major
        split = [S * El] * W
        got = all_to_all_nograd(to_owner, split, split, self.ep_group, "ep.counts").view(W, S, El)  # (src, s, e)
        blocks = got.transpose(0, 1).reshape(S * W, El)  # global pair order: slot-major, then source rank
        before = blocks.cumsum(0) - blocks  # pairs of each local expert ahead of the block
        kept_blocks = (C - before).clamp(min=0).minimum(blocks).view(S, W, El)
        back = kept_blocks.transpose(0, 1).reshape(-1)  # (W*S*El,) source-major
        limits = all_to_all_nograd(back, split, split, self.ep_group, "ep.counts").view(W, S, El)  # (owner, s, e)
        limit = limits.transpose(0, 1).reshape(S * E)[key]  # (P,) survivors of each local (slot, expert)
        keep = _rank_within_groups(key, S * E) < limit
        return keep, C, kept_blocks.sum(0)

    def _priority_keep(self, routing: Routing, cf: float) -> tuple[Tensor, int, Tensor]:
        """``drop_policy="probability"`` on the global batch: owners rank their pairs by priority.

        Every pair's global position and priority go to its expert's owner (16 bytes per pair), the owner
        keeps the C best of each expert (ties: earlier global position) and sends a keep flag back."""
        W, El = self.ep_size, self.num_local_experts
        dev = routing.expert_idx.device
        slot, S, C, _ = self._slots_and_capacity(routing, cf)
        per_slot = all_gather_rows(torch.bincount(slot, minlength=S), self.ep_group, "ep.sizes")  # (W, S)
        block = per_slot.t().reshape(-1)  # (S*W,) pairs per (slot, rank), in global order
        block_start = (block.cumsum(0) - block).view(S, W)
        pos = block_start[slot, self.ep_rank] + _rank_within_groups(slot, S)  # (P,) global positions
        by_expert = torch.argsort(routing.expert_idx, stable=True)  # (P,)
        routed = routing.tokens_per_expert()
        meta = torch.stack([pos.to(torch.float64), routing.pair_priority().detach().to(torch.float64)], 1)
        routed_blocks = all_to_all_nograd(routed, [El] * W, [El] * W, self.ep_group, "ep.counts").view(W, El)
        send, recv = routed.view(W, El).sum(1).tolist(), routed_blocks.sum(1).tolist()
        got = all_to_all_nograd(meta[by_expert], send, recv, self.ep_group, "ep.priority")  # (R, 2) source-major
        # Owner side: plan_capacity's rule per local expert.
        src_expert = torch.arange(W * El, device=dev).repeat_interleave(routed_blocks.reshape(-1))  # (R,)
        expert = src_expert % El
        order = torch.argsort(got[:, 0], stable=True)  # global pair order
        order = order[torch.argsort(got[order, 1], descending=True, stable=True)]  # priority, ties in order
        order = order[torch.argsort(expert[order], stable=True)]
        sizes = torch.bincount(expert, minlength=El)
        rank_in_expert = torch.arange(order.numel(), device=dev) - (sizes.cumsum(0) - sizes)[expert[order]]
        keep_got = torch.zeros(order.numel(), dtype=torch.long, device=dev)
        keep_got[order] = (rank_in_expert < C).long()
        kept_blocks = torch.bincount(src_expert[keep_got.bool()], minlength=W * El).view(W, El)
        flags = all_to_all_nograd(keep_got, recv, send, self.ep_group, "ep.priority")  # (P,) in by_expert order
        keep = torch.zeros(routing.num_pairs, dtype=torch.bool, device=dev)
        keep[by_expert] = flags.bool()
        return keep, C, kept_blocks

    # ------------------------------------------------------------------ compute: dispatch, experts, combine
    def _compute(self, x_real: Tensor, plan: DispatchPlan) -> Tensor:
        ex = self._exchange
        if ex is None:
            raise RuntimeError("ExpertParallelMoELayer._plan must run before _compute")
        send, recv_blocks = ex.send, ex.recv_blocks  # rows to each destination; (W, El) rows received
        recv = recv_blocks.sum(-1).tolist()
        x_send = x_real[plan.token_idx]  # (S, D), grouped by expert, hence by destination
        x_recv = all_to_all(x_send, send, recv, self.ep_group, "dispatch")  # (R, D) source-major
        perm = _expert_major_perm(recv_blocks)  # (R,), or None when the orders coincide
        x_local = x_recv if perm is None else x_recv.index_select(0, perm)  # (R, D) expert-major
        y_local = self.experts(x_local, recv_blocks.sum(0))  # (R, D)
        y_recv = y_local if perm is None else y_local.index_select(0, torch.argsort(perm))  # source-major
        y_sorted = all_to_all(y_recv, recv, send, self.ep_group, "combine")  # (S, D)
        y_sorted = y_sorted * plan.weight.unsqueeze(1).to(y_sorted.dtype)
        out = y_sorted.new_zeros(x_real.shape[0], self.d_model)  # (T, D)
        return out.index_add(0, plan.token_idx, y_sorted)

    # ------------------------------------------------------------------ losses over the global batch
    def _losses(self, routing: Routing) -> dict[str, Tensor]:
        """Load-balance and z losses over the batch of all router replicas (the world, by default)."""
        E, dev, f64 = self.num_experts, routing.expert_idx.device, torch.float64
        psum = torch.zeros(E, dtype=f64, device=dev)
        if routing.probs is not None:
            psum = routing.probs.sum(0).to(f64)
        zsum = torch.zeros(1, dtype=f64, device=dev)
        if routing.logits is not None:
            zsum = torch.logsumexp(routing.logits, dim=-1).square().sum().to(f64).reshape(1)
        routed = routing.tokens_per_expert().to(f64)  # (E,) before drops
        tokens = torch.tensor([float(routing.num_tokens)], dtype=f64, device=dev)
        # One all-reduce of the same shape and dtype on every rank, whatever its routing: collectives match.
        summed = all_reduce_sum(torch.cat([psum, zsum, routed, tokens]), self.replica_group, "ep.aux")
        T_g, routed_g = int(summed[-1]), summed[E + 1 : 2 * E + 1].detach()
        P_g = int(routed_g.sum())
        losses: dict[str, Tensor] = {}
        if routing.probs is not None:
            f = routed_g / max(P_g, 1)  # (E,) global share of pairs
            lb = E * (f * summed[:E]).sum() / T_g if T_g and P_g else summed[:E].sum() * 0
            losses["load_balance"] = lb.to(routing.probs.dtype)
        if routing.logits is not None:
            z = summed[E] / T_g if T_g else summed[E] * 0
            losses["z_loss"] = z.to(routing.logits.dtype)
        losses.update(routing.losses)
        self._exchange = None
        return losses

    # ------------------------------------------------------------------ hooks
    def after_optimizer_step(self) -> None:
        """The router hook with the load summed over all router replicas (so that they stay identical)."""
        load = self.load_since_step.clone()
        self.load_since_step.zero_()
        with collective_guard("load all_reduce in after_optimizer_step", self.replica_group):
            dist.all_reduce(load, group=self.replica_group)
        self.router.after_optimizer_step(load)

    def add_expert(self, init_from: int | None = None) -> int:
        raise NotImplementedError("add_expert is not supported under expert parallelism")

    def remove_expert(self, e: int) -> None:
        raise NotImplementedError("remove_expert is not supported under expert parallelism")

    def extra_repr(self) -> str:
        return (
            f"ep_size={self.ep_size}, ep_rank={self.ep_rank}, experts=[{self.expert_start}, "
            f"{self.expert_start + self.num_local_experts}) of {self.num_experts}, "
            f"capacity_scope={self.capacity_scope!r}"
        )


def expert_parallel(
    model: nn.Module,
    groups: ParallelGroups | dist.ProcessGroup | None = None,
    capacity_scope: str = "global",
) -> nn.Module:
    """Replace every ``MoELayer`` in ``model`` (in place) by an ``ExpertParallelMoELayer``; returns the model.

    ``groups``: a ``ParallelGroups`` (its EP group; router replicas = the world), a process group used as the
    EP group, or None (the whole world). A bare ``MoELayer`` is wrapped and returned.
    """
    ep_group = groups.ep_group if isinstance(groups, ParallelGroups) else groups

    def wrap(layer: MoELayer) -> ExpertParallelMoELayer:
        return ExpertParallelMoELayer(layer, ep_group, capacity_scope)

    if isinstance(model, MoELayer) and not isinstance(model, ExpertParallelMoELayer):
        return wrap(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoELayer) and not isinstance(child, ExpertParallelMoELayer):
                setattr(module, name, wrap(child))
    return model


def global_param_counts(model: nn.Module) -> dict[str, int]:
    """``MoETransformerLM.param_counts()`` of the full model, from one rank of an expert-parallel one.

    ``total`` counts every expert of the global E once (not only this rank's shard); ``active`` subtracts,
    per MoE layer, the ``num_experts - k`` experts a token does not use (as ``param_counts`` does)."""
    total = sum(p.numel() for p in model.parameters())  # a tied weight once
    inactive = 0
    for m in model.modules():
        if not isinstance(m, MoELayer) or m.experts is None:
            continue
        held = m.num_local_experts if isinstance(m, ExpertParallelMoELayer) else m.num_experts
        per_expert = sum(p.numel() for p in m.experts.parameters()) // max(held, 1)
        total += (m.num_experts - held) * per_expert
        inactive += (m.num_experts - m.k) * per_expert
    return {"total": total, "active": total - inactive}


def _signature(layer: MoELayer, capacity_scope: str) -> dict:
    """What must agree across ranks for the collectives to line up and the replicas to stay identical."""
    experts = layer.experts
    return {
        "d_model": layer.d_model,
        "num_experts": layer.num_experts,
        "k": layer.k,
        "capacity_factor": layer.capacity_factor,
        "eval_capacity_factor": layer.eval_capacity_factor,
        "drop_policy": layer.drop_policy,
        "min_capacity": layer.min_capacity,
        "capacity_scope": capacity_scope,
        "loss_weights": layer.loss_weights,
        "router": repr(layer.router),
        "experts": repr(experts),
        "dtype": str(experts.down_proj.dtype),
        "params": {name: list(p.shape) for name, p in layer.named_parameters()},
    }


def _slice_experts(full: GroupedFFN, start: int, stop: int) -> GroupedFFN:
    """A GroupedFFN holding copies of experts ``[start, stop)`` of ``full``."""
    ref = full.down_proj
    local = GroupedFFN(full.d_model, full.d_ff, stop - start, activation=full.activation, backend=full.backend)
    local = local.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, param in full.named_parameters(recurse=False):
            getattr(local, name).copy_(param[start:stop])
    return local


def _rank_within_groups(key: Tensor, num_groups: int) -> Tensor:
    """(P,) how many earlier entries share each entry's key (0 for the first of its group)."""
    P = key.numel()
    if P == 0:
        return key.clone()
    order = torch.argsort(key, stable=True)
    sizes = torch.bincount(key, minlength=num_groups)
    starts = sizes.cumsum(0) - sizes
    out = torch.empty_like(key)
    out[order] = torch.arange(P, device=key.device) - starts[key[order]]
    return out


def _expert_major_perm(blocks: Tensor) -> Tensor | None:
    """blocks (W, El) row counts per (source, local expert) -> perm (R,) with
    ``expert_major = source_major[perm]``, or None when both orders coincide."""
    W, El = blocks.shape
    if W == 1 or El == 1:
        return None
    flat = blocks.reshape(-1)
    src_start = (flat.cumsum(0) - flat).view(W, El)  # start of each block in source-major order
    sizes_t = blocks.t().reshape(-1)  # (El*W,) block sizes in expert-major order
    starts_t = src_start.t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(El * W, device=blocks.device), sizes_t)  # (R,)
    offset = torch.arange(block.numel(), device=blocks.device) - (sizes_t.cumsum(0) - sizes_t)[block]
    return starts_t[block] + offset
