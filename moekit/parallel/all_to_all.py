"""Differentiable collectives for expert parallelism, with byte and time accounting.

- ``all_to_all(x, send_splits, recv_splits, group)``: ``all_to_all_single`` with uneven splits; its backward
  is the reverse all-to-all (splits swapped).
- ``all_reduce_sum(x, group)``: sum over the group; backward sums the incoming gradients over the group (the
  usual convention: with gradients averaged over ranks afterwards, this gives the gradient of the mean loss).

Every call takes a zero-size *anchor* that requires grad whenever grad mode is on. Without it, a rank whose
input does not require grad (it received no tokens, say) would build no autograd node, skip the collective in
backward and leave its peers waiting. With it, every rank runs the same collectives in the same order in
backward too (use ``loss.backward()``; ``torch.autograd.grad`` with explicit inputs may prune nodes on some
ranks only).

``comm_stats()`` counts rows, bytes and seconds per tag (``"dispatch.fwd"``, ``"combine.bwd"``, ...) so that
the cost model can be checked against what was actually sent: ``bytes`` counts every row handed to the
collective, ``remote_bytes`` only the rows for other ranks (a rank's rows for itself never touch a link).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.parallel.mesh import collective_guard


@dataclass
class CommStat:
    calls: int = 0
    rows: int = 0
    bytes: int = 0
    remote_bytes: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    """Per-tag counters of this process; ``reset()`` between measurements."""

    tags: dict[str, CommStat] = field(default_factory=dict)

    def add(self, tag: str, rows: int, nbytes: int, remote: int, seconds: float) -> None:
        s = self.tags.setdefault(tag, CommStat())
        s.calls += 1
        s.rows += rows
        s.bytes += nbytes
        s.remote_bytes += remote
        s.seconds += seconds

    def reset(self) -> None:
        self.tags.clear()

    def total(self, prefix: str = "") -> CommStat:
        """The sum over the tags that start with ``prefix``."""
        out = CommStat()
        for tag, s in self.tags.items():
            if tag.startswith(prefix):
                out.calls += s.calls
                out.rows += s.rows
                out.bytes += s.bytes
                out.remote_bytes += s.remote_bytes
                out.seconds += s.seconds
        return out

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {tag: vars(s).copy() for tag, s in sorted(self.tags.items())}


_STATS = CommStats()


def comm_stats() -> CommStats:
    """The process-wide counters."""
    return _STATS


def _anchor() -> Tensor:
    return torch.empty(0, requires_grad=torch.is_grad_enabled())


def _row_bytes(x: Tensor) -> int:
    n = 1
    for d in x.shape[1:]:
        n *= d
    return n * x.element_size()


def all_to_all_nograd(x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None, tag: str) -> Tensor:
    """Uneven all-to-all without autograd (counts, metadata). x (sum(send), *) -> (sum(recv), *):
    ``send[d]`` rows go to rank d, ``recv[s]`` rows come from rank s."""
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    me = dist.get_rank(group)
    start = time.perf_counter()
    with collective_guard(f"expert-parallel all_to_all ({tag})", group):
        dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    rows, row = sum(send), _row_bytes(x)
    _STATS.add(tag, rows, rows * row, (rows - send[me]) * row, time.perf_counter() - start)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, send: list[int], recv: list[int], group, tag: str) -> Tensor:  # noqa: D102
        ctx.send, ctx.recv, ctx.group, ctx.tag = send, recv, group, tag
        return all_to_all_nograd(x, send, recv, group, f"{tag}.fwd")

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        grad_x = all_to_all_nograd(grad, ctx.recv, ctx.send, ctx.group, f"{ctx.tag}.bwd")
        return grad_x, None, None, None, None, None


def all_to_all(
    x: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None,
    tag: str = "a2a",
) -> Tensor:
    """Differentiable uneven all-to-all. x (sum(send_splits), *) -> (sum(recv_splits), *)."""
    return _AllToAll.apply(x, _anchor(), list(send_splits), list(recv_splits), group, tag)


def _all_reduce(x: Tensor, group: dist.ProcessGroup | None, tag: str) -> Tensor:
    out = x.detach().clone().contiguous()
    start = time.perf_counter()
    with collective_guard(f"all_reduce ({tag})", group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    nbytes = out.numel() * out.element_size()
    _STATS.add(tag, 1, nbytes, nbytes, time.perf_counter() - start)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, group, tag: str) -> Tensor:  # noqa: D102
        ctx.group, ctx.tag = group, tag
        return _all_reduce(x, group, f"{tag}.fwd")

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return _all_reduce(grad, ctx.group, f"{ctx.tag}.bwd"), None, None, None


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None, tag: str = "all_reduce") -> Tensor:
    """Differentiable sum over the group (forward and backward are both SUM all-reduces)."""
    return _AllReduceSum.apply(x, _anchor(), group, tag)


def all_gather_rows(x: Tensor, group: dist.ProcessGroup | None, tag: str = "all_gather") -> Tensor:
    """Non-differentiable all-gather of equal-shape tensors: x (*) -> (W, *)."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(size)]
    start = time.perf_counter()
    with collective_guard(f"all_gather ({tag})", group):
        dist.all_gather(out, x, group=group)
    nbytes = x.numel() * x.element_size()
    _STATS.add(tag, 1, nbytes * size, nbytes * (size - 1), time.perf_counter() - start)
    return torch.stack(out)
