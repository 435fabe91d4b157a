"""Training checkpoints of expert-parallel runs, in the single-process trainer's format.

The distributed trainer writes what ``moekit.training.Trainer`` writes (``step_*/model.safetensors``,
``optimizer.safetensors``, ``state.json``, ``latest``; see ``moekit.training.checkpoint``): the expert
parameters and their AdamW moments are gathered from their EP shards to rank 0, which writes full tensors
under the single-process names and parameter indices. Hence a checkpoint saved at one EP size resumes

- at any other EP size (each rank slices out the experts it holds, optimizer moments included),
- in the single-process trainer (``moekit train CONFIG --resume``),

and a single-process checkpoint resumes under torchrun.

Cost: rank 0 holds one full copy of every expert tensor and its two moments while writing, and every rank
reads the full files when resuming; fine for models whose experts fit one host's memory. Beyond that,
``moekit.parallel.checkpoint`` writes per-shard weight files (no optimizer state) without gathering.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.parallel.checkpoint import expert_parameters, param_names
from moekit.parallel.mesh import ParallelGroups, collective_guard
from moekit.training import checkpoint as ckpt

CheckpointError = ckpt.CheckpointError


def sharded_experts(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """State-dict name -> (global E, first expert held, end) of the expert parameters held in part."""
    return {name: r for name, r in expert_parameters(model).items() if r[2] - r[1] < r[0]}


class _Snapshot:
    """Stands in for the model / optimizer in ``moekit.training.checkpoint.save_checkpoint``, which only calls
    ``state_dict()`` (and records the optimizer's class name): no second full model is materialised."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _gather_rows(t: Tensor, groups: ParallelGroups, what: str) -> Tensor | None:
    """Concatenate the EP shards of ``t`` (each (E/W, ...)) on EP rank 0: (E, ...) there, None elsewhere."""
    t = t.detach().contiguous()
    root = dist.get_global_rank(groups.ep_group, 0)
    parts = [torch.empty_like(t) for _ in range(groups.ep_size)] if groups.ep_rank == 0 else None
    with collective_guard(f"checkpoint gather of {what}", groups.ep_group):
        dist.gather(t, parts, dst=root, group=groups.ep_group)
    return torch.cat(parts).cpu() if parts is not None else None


def consolidated_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, groups: ParallelGroups | None
) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(model state_dict, optimizer state_dict) as one process training the full model would have them.

    Collective over the EP group of DP rank 0 (other ranks return None at once); returns None except on the
    global rank 0."""
    sharded = sharded_experts(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not sharded or groups is None or not groups.distributed:
        return (model.state_dict(), optimizer.state_dict()) if rank == 0 else None
    if groups.dp_rank != 0:
        return None
    state = model.state_dict()
    full_model = {}
    for name, t in state.items():  # state_dict order: the same on every rank
        full_model[name] = _gather_rows(t, groups, name) if name in sharded else t
    osd = optimizer.state_dict()
    names = param_names(model, optimizer)
    full_state: dict[int, dict[str, Any]] = {}
    for pid in sorted(osd["state"]):
        entry = dict(osd["state"][pid])
        if names[pid] in sharded:
            for key in sorted(entry):
                value = entry[key]
                if isinstance(value, Tensor) and value.dim() >= 1:  # exp_avg, exp_avg_sq: sharded like the param
                    entry[key] = _gather_rows(value, groups, f"{names[pid]} {key}")
        full_state[pid] = entry
    if rank != 0:
        return None
    return full_model, {"state": full_state, "param_groups": osd["param_groups"]}


def save_training_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: ParallelGroups | None,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path | None:
    """Gather and write ``root/step_{step:06d}`` in the trainer's format (rank 0 writes; collective: every
    rank must call it). ``state["parallel"]["param_names"]`` records the optimizer's parameter order."""
    full = consolidated_state(model, optimizer, groups)
    if full is None:
        return None
    model_sd, optim_sd = full
    state = {**state, "parallel": {**state.get("parallel", {}), "param_names": param_names(model, optimizer)}}
    opt = type(type(optimizer).__name__, (_Snapshot,), {})(optim_sd)  # records "AdamW" like the trainer does
    return ckpt.save_checkpoint(root, step, _Snapshot(model_sd), opt, state=state, keep_last=keep_last)


def _read_verified(folder: Path, name: str, files: dict[str, str]) -> dict[str, Tensor]:
    from safetensors.torch import load as st_load

    path = folder / name
    if name not in files:
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {name}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != files[name]:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt (its sha256 does not match state.json)")
    try:
        return st_load(data)
    except Exception as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is unreadable: {exc}") from exc


def _slice(t: Tensor, E: int, start: int, stop: int, name: str) -> Tensor:
    if t.dim() == 0 or t.shape[0] != E:
        raise CheckpointError(f"{name}: checkpoint shape {tuple(t.shape)} does not hold {E} experts")
    return t[start:stop]


@torch.no_grad()
def load_training_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a trainer-format checkpoint (a ``step_*`` folder or a root) saved at any EP size, or by the
    single-process trainer, into this rank's (possibly expert-parallel) ``model`` and ``optimizer``; returns
    the ``state.json`` document. Not collective; every file's sha256 is checked before anything is touched."""
    doc = ckpt.read_checkpoint_state(path)
    folder, files = Path(doc["path"]), doc["files"]
    sharded = sharded_experts(model)
    tensors = _read_verified(folder, ckpt.MODEL_FILE, files)
    for alias, target in doc.get("aliases", {}).items():
        tensors[alias] = tensors[target]
    own = model.state_dict()
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise CheckpointError(
            f"checkpoint {str(folder)!r} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    new_model = {}
    for name, dest in own.items():
        src = tensors[name]
        if name in sharded:
            src = _slice(src, *sharded[name], name)
        if src.shape != dest.shape:
            raise CheckpointError(f"{name}: checkpoint shape {tuple(src.shape)}, the model {tuple(dest.shape)}")
        new_model[name] = src
    new_optim = None
    if optimizer is not None:
        new_optim = _optimizer_state(doc, folder, model, optimizer, sharded)
    model.load_state_dict(new_model, strict=True)
    if new_optim is not None:
        optimizer.load_state_dict(new_optim)
    return doc


def _optimizer_state(
    doc: dict[str, Any],
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sharded: dict[str, tuple[int, int, int]],
) -> dict[str, Any]:
    meta = doc.get("optimizer")
    if meta is None:
        raise CheckpointError(f"checkpoint {str(folder)!r} holds no optimizer state")
    names = param_names(model, optimizer)
    saved_names = doc["state"].get("parallel", {}).get("param_names")
    if saved_names is not None and saved_names != names:
        raise CheckpointError(
            f"checkpoint {str(folder)!r}: the optimizer's parameter order differs from this model's "
            f"(first saved {saved_names[:3]}, here {names[:3]})"
        )
    groups = meta["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"checkpoint {str(folder)!r} does not match the optimizer's parameter groups")
    state: dict[int, dict[str, Any]] = {}
    for key, value in _read_verified(folder, ckpt.OPTIM_FILE, doc["files"]).items():
        pid, _, field = key.partition(".")
        pid = int(pid)
        if pid >= len(names):
            raise CheckpointError(f"checkpoint {str(folder)!r}: optimizer state for parameter {pid} of {len(names)}")
        if names[pid] in sharded and value.dim() >= 1:
            value = _slice(value, *sharded[names[pid]], f"{names[pid]} {field}")
        state.setdefault(pid, {})[field] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    param_groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else dict(g) for g in groups]
    return {"state": state, "param_groups": param_groups}
