"""Data parallelism for the non-expert parameters, done by hand (the simplest correct scheme).

- Replicated (non-expert) parameters: gradients summed over all ``W`` ranks and divided by ``W``.
- Expert parameters (this rank's shard): the shard's gradient already sums the contributions of the whole EP
  group (through the all-to-all backward); it is summed over the shard's replicas (the DP group) and divided
  by ``W`` as well.

With per-rank losses "local mean + aux", both give the gradient of the mean loss over the global batch, i.e.
what one process computes on all ranks' batches at once. Gradients are flattened into one buffer per group
(one all-reduce each); missing gradients count as zeros, so a rank whose experts got no tokens still sends a
buffer of the same size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.parallel.ep_layer import ExpertParallelMoELayer
from moekit.parallel.mesh import ParallelGroups, collective_device, collective_guard


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert) parameters; expert ones are the shards of ``ExpertParallelMoELayer.experts``."""
    expert_ids = {
        id(p) for m in model.modules() if isinstance(m, ExpertParallelMoELayer) for p in m.experts.parameters()
    }
    replicated, expert = [], []
    for p in model.parameters():  # a tied parameter appears once
        (expert if id(p) in expert_ids else replicated).append(p)
    return replicated, expert


@torch.no_grad()
def broadcast_replicated(model: nn.Module, groups: ParallelGroups) -> None:
    """Make replicas identical: non-expert parameters and buffers from rank 0, expert shards from the first
    rank of their DP group."""
    replicated, expert = split_parameters(model)
    with collective_guard("broadcast of replicated parameters"):
        for t in replicated + list(model.buffers()):
            dist.broadcast(t.data, src=0)
        if groups.dp_size > 1:
            src = dist.get_global_rank(groups.dp_group, 0)
            for p in expert:
                dist.broadcast(p.data, src=src, group=groups.dp_group)


def _flat_grads(params: list[nn.Parameter]) -> Tensor:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return torch.cat([p.grad.reshape(-1) for p in params])


def _unflatten(params: list[nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """All-reduce gradients as the module doc says (after ``backward``, before the optimizer step)."""
    world = groups.world_size
    replicated, expert = split_parameters(model)
    for params, group, name in ((replicated, None, "replicated"), (expert, groups.dp_group, "expert")):
        if not params:
            continue
        flat = _flat_grads(params)
        if name == "replicated" or groups.dp_size > 1:
            with collective_guard(f"gradient all_reduce ({name})", group):
                dist.all_reduce(flat, group=group)
        _unflatten(params, flat / world)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ParallelGroups) -> float:
    """Clip by the norm of the whole (unsharded) gradient; returns that norm, before clipping.

    Replicated gradients are identical on all ranks after ``sync_gradients`` and count once; the squares of
    the expert shards are summed over the EP group (each shard once).
    """
    replicated, expert = split_parameters(model)
    rep_sq = _sum_sq(replicated)
    exp_sq = torch.tensor([_sum_sq(expert)], dtype=torch.float64, device=collective_device())
    if groups.ep_size > 1:
        with collective_guard("gradient norm all_reduce", groups.ep_group):
            dist.all_reduce(exp_sq, group=groups.ep_group)
    norm = math.sqrt(rep_sq + float(exp_sq))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in replicated + expert:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def _sum_sq(params: Iterable[nn.Parameter]) -> float:
    return float(sum(p.grad.double().square().sum() for p in params if p.grad is not None))


def global_mean(value: float | Tensor, group: dist.ProcessGroup | None = None) -> float:
    """Mean of a scalar over the group (for logging)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    with collective_guard("logging all_reduce", group):
        dist.all_reduce(t, group=group)
    return float(t) / dist.get_world_size(group)
