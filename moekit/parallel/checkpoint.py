"""Resharding checkpoints for expert-parallel models (safetensors and a JSON manifest, no pickle).

A checkpoint is a directory holding:

- ``replicated.safetensors``: every non-expert tensor of ``state_dict()``, written by rank 0 (a tied tensor
  once; its other names are listed as aliases in the manifest).
- ``experts-{r:05d}-of-{W:05d}.safetensors``: EP rank r's slice of each expert parameter under the
  parameter's full name (e.g. ``blocks.0.ffn.experts.gate_up_proj``, shape ``(E/W, 2F, D)``), written by the
  rank holding that shard with DP rank 0; the file's metadata names the global expert range.
- ``manifest.json``: format, version, EP size at save time, the global shape of each expert parameter, each
  shard's file and global expert range per parameter, the aliases, and the caller's ``extra`` data (e.g. the
  LMConfig). Removed first and written last, so a directory with a manifest is a complete checkpoint.
- With ``optimizer=``: its state tensors under ``optimizer/{parameter name}/{key}`` (``exp_avg``,
  ``exp_avg_sq``, ``step`` for AdamW), sharded like their parameter (expert moments in the shard files, the
  rest in the replicated file); the parameter groups (hyper-parameters and parameter *names*) and non-tensor
  state go in the manifest. Loading maps names to the loading optimizer's parameters, so the moments
  reshard with the weights.

``load_checkpoint`` needs no communication: each rank (or a single process with a plain model) reads the
replicated file and, per expert parameter, the ranges of the shard files that overlap the experts it holds.
So a checkpoint saved with EP=2 loads with EP=1, EP=4 or into a single-process model. Each file is written
to a temporary name and renamed over the final one (atomic).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from moekit.atomic_io import atomic_write_bytes
from moekit.experts.grouped import GroupedFFN
from moekit.layer import MoELayer
from moekit.parallel.ep_layer import ExpertParallelMoELayer
from moekit.parallel.mesh import ParallelGroups, collective_guard, shard_range

FORMAT = "moekit.expert-parallel-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
REPLICATED = "replicated.safetensors"


OPTIM_PREFIX = "optimizer/"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit the model."""


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its index order (the order of ``state_dict()["state"]``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            out.append(names[id(p)])
    return out


def _group_names(optimizer: torch.optim.Optimizer, names: list[str]) -> list[list[str]]:
    out, i = [], 0
    for g in optimizer.param_groups:
        out.append(names[i : i + len(g["params"])])
        i += len(g["params"])
    return out


def _optimizer_parts(
    model: nn.Module, optimizer: torch.optim.Optimizer, experts: dict[str, tuple[int, int, int]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(replicated tensors, this shard's tensors, manifest entry) of the optimizer state, keyed by names."""
    names = param_names(model, optimizer)
    sd = optimizer.state_dict()
    replicated, shard, scalars, keys = {}, {}, {}, {}
    for pid, name in enumerate(names):
        entry = sd["state"].get(pid, {})
        keys[name] = sorted(k for k, v in entry.items() if isinstance(v, torch.Tensor))
        for key, value in sorted(entry.items()):
            if not isinstance(value, torch.Tensor):
                scalars.setdefault(name, {})[key] = value
                continue
            value = value.detach().cpu().contiguous()
            if name in experts and value.dim() >= 1:  # sharded like the parameter (exp_avg, exp_avg_sq)
                shard[f"{OPTIM_PREFIX}{name}/{key}"] = value
            else:
                replicated[f"{OPTIM_PREFIX}{name}/{key}"] = value
    hyper = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"} for g in sd["param_groups"]
    ]
    groups = [{**h, "params": n} for h, n in zip(hyper, _group_names(optimizer, names), strict=True)]
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars, "state_keys": keys}
    return replicated, shard, meta


def expert_parameters(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Full state-dict name -> (global E, first expert held, end) for every expert parameter of ``model``."""
    out: dict[str, tuple[int, int, int]] = {}
    for mname, m in model.named_modules():
        if not isinstance(m, MoELayer) or not isinstance(m.experts, GroupedFFN):
            continue
        if isinstance(m, ExpertParallelMoELayer):
            start, stop = m.expert_start, m.expert_start + m.num_local_experts
        else:
            start, stop = 0, m.num_experts
        prefix = f"{mname}.experts." if mname else "experts."
        for pname, _ in m.experts.named_parameters(recurse=False):
            out[prefix + pname] = (m.num_experts, start, stop)
    return out


def _ep_layout(model: nn.Module) -> tuple[int, int]:
    """(EP size, EP rank) shared by every expert-parallel layer of the model; (1, 0) without any."""
    layouts = {(m.ep_size, m.ep_rank) for m in model.modules() if isinstance(m, ExpertParallelMoELayer)}
    if len(layouts) > 1:
        raise CheckpointError(f"expert-parallel layers disagree on (ep_size, ep_rank): {sorted(layouts)}")
    return layouts.pop() if layouts else (1, 0)


def _barrier() -> None:
    if dist.is_initialized():
        with collective_guard("checkpoint barrier"):
            dist.barrier()


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    groups: ParallelGroups | None = None,
    extra: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``model`` (and ``optimizer``'s state) to the directory ``path``. Collective when distributed:
    every rank must call it."""
    path = Path(path)
    ep_size, ep_rank = _ep_layout(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp_rank = groups.dp_rank if groups is not None else rank // ep_size
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
    _barrier()
    state = model.state_dict()
    experts = expert_parameters(model)
    opt_rep, opt_shard, opt_meta = _optimizer_parts(model, optimizer, experts) if optimizer else ({}, {}, None)
    if dp_rank == 0:
        tensors = {name: state[name].detach().cpu().contiguous() for name in experts}
        meta = {name: f"{start}:{stop}" for name, (_, start, stop) in experts.items()}
        tensors.update(opt_shard)
        atomic_write_bytes(path / _shard_name(ep_rank, ep_size), safetensors_save(tensors, metadata=meta))
    aliases: dict[str, str] = {}
    if rank == 0:
        tensors, seen = {}, {}
        for name, t in state.items():
            if name in experts:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous()
        tensors.update(opt_rep)
        atomic_write_bytes(path / REPLICATED, safetensors_save(tensors))
    _barrier()
    if rank == 0:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "ep_size": ep_size,
            "replicated": {"file": REPLICATED, "aliases": aliases},
            "experts": {
                name: {
                    "num_experts": E,
                    "shape": [E, *state[name].shape[1:]],
                    "dtype": str(state[name].dtype),
                }
                for name, (E, _, _) in experts.items()
            },
            "shards": [
                {
                    "file": _shard_name(r, ep_size),
                    "ep_rank": r,
                    "ranges": {name: list(shard_range(E, ep_size, r)) for name, (E, _, _) in experts.items()},
                }
                for r in range(ep_size)
            ],
            "extra": extra or {},
        }
        if opt_meta is not None:
            manifest["optimizer"] = opt_meta
        atomic_write_bytes(path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    _barrier()
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed and checked ``manifest.json`` of a checkpoint directory."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{file} has version {manifest.get('version')!r}; this moekit reads {VERSION}")
    return manifest


@torch.no_grad()
def load_checkpoint(
    model: nn.Module, path: str | Path, strict: bool = True, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a checkpoint saved with any EP size into ``model`` (any EP size, or none) and, if given,
    ``optimizer`` (built over ``model``'s parameters; its moments reshard like the weights); returns ``extra``.

    Not collective. ``strict``: every model tensor must be in the checkpoint and vice versa.
    """
    path = Path(path)
    manifest = read_manifest(path)
    state = model.state_dict()
    experts = expert_parameters(model)
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}

        def open_file(name: str) -> Any:
            if name not in handles:
                file = path / name
                if not file.is_file():
                    raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
                handles[name] = stack.enter_context(safe_open(str(file), framework="pt"))
            return handles[name]

        rep = open_file(manifest["replicated"]["file"])
        aliases = manifest["replicated"].get("aliases", {})
        available = {k for k in rep.keys() if not k.startswith(OPTIM_PREFIX)}
        used, missing = set(), []
        for name, dest in state.items():
            if name in experts:
                continue
            src = name if name in available else aliases.get(name)
            if src not in available:
                missing.append(name)
                continue
            used.add(src)
            _copy(dest, rep.get_tensor(src), name)
        unexpected = sorted(available - used)
        saved_experts = manifest.get("experts", {})
        missing += [name for name in experts if name not in saved_experts]
        unexpected += sorted(set(saved_experts) - set(experts))
        if strict and (missing or unexpected):
            raise CheckpointError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
        for name, (E, start, stop) in experts.items():
            if name not in saved_experts:
                continue
            info, dest = saved_experts[name], state[name]
            if info["num_experts"] != E or list(info["shape"][1:]) != list(dest.shape[1:]):
                raise CheckpointError(f"{name}: checkpoint shape {info['shape']}, model needs {[E, *dest.shape[1:]]}")
            filled = 0
            for shard in manifest["shards"]:
                s_start, s_stop = shard["ranges"][name]
                lo, hi = max(start, s_start), min(stop, s_stop)
                if lo < hi:
                    piece = open_file(shard["file"]).get_slice(name)[lo - s_start : hi - s_start]
                    _copy(dest[lo - start : hi - start], piece, name)
                    filled += hi - lo
            if filled != stop - start:
                raise CheckpointError(f"{name}: the shards cover {filled} of the {stop - start} experts needed")
        if optimizer is not None:
            optimizer.load_state_dict(_optimizer_state(manifest, model, optimizer, experts, rep, open_file, path))
    return manifest.get("extra", {})


def _optimizer_state(
    manifest: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    experts: dict[str, tuple[int, int, int]],
    rep: Any,
    open_file: Any,
    path: Path,
) -> dict[str, Any]:
    """``optimizer.state_dict()`` for this model's parameters from the checkpoint (expert moments sliced to
    the experts held here)."""
    meta = manifest.get("optimizer")
    if meta is None:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state (saved without optimizer=)")
    names = param_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    ours = _group_names(optimizer, names)
    if [g["params"] for g in meta["param_groups"]] != ours:
        raise CheckpointError(f"checkpoint {str(path)!r}: the optimizer's parameter groups differ from the saved ones")
    in_rep = set(rep.keys())
    state: dict[int, dict[str, Any]] = {}
    for name, keys in meta["state_keys"].items():
        entry = state.setdefault(index[name], {})
        for key in keys:
            fkey = f"{OPTIM_PREFIX}{name}/{key}"
            if fkey in in_rep:
                entry[key] = rep.get_tensor(fkey)
                continue
            _, start, stop = experts[name]
            pieces = []
            for shard in manifest["shards"]:
                s_start, s_stop = shard["ranges"][name]
                lo, hi = max(start, s_start), min(stop, s_stop)
                if lo < hi:
                    pieces.append(open_file(shard["file"]).get_slice(fkey)[lo - s_start : hi - s_start])
            if sum(p.shape[0] for p in pieces) != stop - start:
                raise CheckpointError(f"{fkey}: the shards do not cover experts [{start}, {stop})")
            entry[key] = torch.cat(pieces)
        entry.update(meta["scalars"].get(name, {}))
    groups = [
        {
            **{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"},
            "params": [index[n] for n in own],
        }
        for g, own in zip(meta["param_groups"], ours, strict=True)
    ]
    return {"state": state, "param_groups": groups}


def _copy(dest: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        raise CheckpointError(f"{name}: checkpoint shape {tuple(src.shape)} != model shape {tuple(dest.shape)}")
    dest.copy_(src)


def _shard_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-{ep_rank:05d}-of-{ep_size:05d}.safetensors"
