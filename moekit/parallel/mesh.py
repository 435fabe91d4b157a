"""Process groups of an expert-parallel (EP) x data-parallel (DP) layout, built with ``DeviceMesh``.

The world of ``W`` ranks is a 2-D mesh ``(dp, ep)`` with ``dp = W // ep`` and
``rank = dp_rank * ep + ep_rank``, so the ranks of one EP group are contiguous (on GPUs: one node's NVLink
island). Within an EP group every rank holds ``E / ep`` experts (shard ``ep_rank``) and its own slice of the
batch; the ``dp`` ranks with the same ``ep_rank`` hold replicas of the same expert shard. Non-expert
parameters are replicated on all ``W`` ranks.

Also here: config-consistency checks (an all-gather of a config hash) and ``collective_guard``, which turns
the backend's errors (peer died, timeout) into one clear ``DistributedError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, diverged, or did not answer within the process-group timeout."""


class ConfigMismatchError(ValueError):
    """Ranks were started with different configurations."""


@contextlib.contextmanager
def collective_guard(what: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Re-raise a backend failure inside the block as ``DistributedError`` naming the collective."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:  # DistBackendError, gloo "Connection closed by peer", timeouts
        rank = dist.get_rank() if dist.is_initialized() else 0
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        raise DistributedError(
            f"{what} failed on rank {rank} (group of {size}): a peer rank died, ran a different number of "
            f"collectives, or did not answer within the process-group timeout. Backend error: {exc}"
        ) from exc


@dataclass(frozen=True)
class ParallelGroups:
    """The groups one rank belongs to. ``None`` groups mean "not distributed" (a single process)."""

    ep_size: int = 1
    ep_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    ep_group: dist.ProcessGroup | None = None  # ranks exchanging tokens (all-to-all) and sharding experts
    dp_group: dist.ProcessGroup | None = None  # ranks holding replicas of the same expert shard
    mesh: Any = None  # the DeviceMesh ("dp", "ep"), when built with build_groups

    @property
    def world_size(self) -> int:
        return self.ep_size * self.dp_size

    @property
    def rank(self) -> int:
        return self.dp_rank * self.ep_size + self.ep_rank

    @property
    def distributed(self) -> bool:
        return self.ep_group is not None


def shard_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """Global expert indices ``[start, stop)`` held by ``ep_rank``; E must be divisible by the EP size."""
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must lie in [0, ep_size={ep_size}), got {ep_rank}")
    if num_experts % ep_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}: every EP "
            f"rank must hold the same number of experts; pick an EP size that divides {num_experts}"
        )
    per_rank = num_experts // ep_size
    return ep_rank * per_rank, (ep_rank + 1) * per_rank


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """``init_process_group`` from torchrun's environment (``env://``) unless already initialised.

    Backend: NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every collective, so a dead or stuck
    peer surfaces as an error instead of a hang.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def collective_device() -> torch.device:
    """Where small control tensors live for collectives: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_groups(ep_size: int | None = None, device_type: str | None = None) -> ParallelGroups:
    """The (dp, ep) ``DeviceMesh`` of the initialised world and this rank's groups; ``ep_size`` defaults
    to the world size."""
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed to be initialised (see init_distributed)")
    world = dist.get_world_size()
    ep_size = world if ep_size is None else ep_size
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size must be a positive divisor of the world size {world}, got {ep_size!r}")
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    rank = dist.get_rank()
    return ParallelGroups(
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        dp_size=world // ep_size,
        dp_rank=rank // ep_size,
        ep_group=mesh.get_group("ep"),
        dp_group=mesh.get_group("dp"),
        mesh=mesh,
    )


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON of ``config`` (a dict, an object with ``to_dict``, any JSON value)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    text = json.dumps(config, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_consistent(config: Any, group: dist.ProcessGroup | None = None, what: str = "config") -> None:
    """All-gather a hash of ``config``; every rank raises ``ConfigMismatchError`` if any rank differs.

    All ranks take part in the same collective and see the same hashes, so they all raise together (no hang).
    """
    digest = bytes.fromhex(config_hash(config))
    words = [int.from_bytes(digest[i : i + 8], "big", signed=True) for i in range(0, 32, 8)]
    local = torch.tensor(words, device=collective_device())
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(local) for _ in range(size)]
    with collective_guard(f"{what} consistency check", group):
        dist.all_gather(gathered, local, group=group)
    odd = [r for r, h in enumerate(gathered) if not torch.equal(h, gathered[0])]
    if odd:
        raise ConfigMismatchError(
            f"the {what} differs across ranks: ranks {odd} disagree with rank 0 of the group (config hashes "
            f"differ); start every rank with the same {what}"
        )
