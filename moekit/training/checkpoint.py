"""Safe, atomic checkpoints: safetensors for tensors, JSON for everything else; never pickle.

Layout of a checkpoint root (e.g. ``out/moe/checkpoints``)::

    step_000120/model.safetensors      model state_dict (tied weights stored once, aliases in state.json)
    step_000120/optimizer.safetensors  optimizer state tensors (exp_avg, exp_avg_sq, step, ...)
    step_000120/state.json             format, step, caller state (configs, data position, ...), optimizer
                                       hyper-parameters, RNG states as lists, sha256 of every file
    latest                             the name of the newest complete checkpoint ("step_000120")

A checkpoint is written into a hidden temp folder next to its final place, every file fsynced, then renamed
into place with one ``os.replace``; only then is ``latest`` rewritten (atomically) and old checkpoints
pruned. A writer killed at any point leaves the previous checkpoint and ``latest`` intact; stale temp
folders are removed by the next save. Loading checks the sha256 of every file, so a truncated or corrupt
file is reported by name instead of being half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.atomic_io import atomic_write_bytes

FORMAT = "moekit.checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
PREFIX = "step_"
_TMP_PREFIX = ".tmp_"

# Test hook: called with the temp folder after every file is written and fsynced, before the rename.
_before_publish: Callable[[Path], None] | None = None


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


# ---------------------------------------------------------------------------------------------- writing
def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``root/step_{step:06d}`` atomically, point ``root/latest`` at it, keep the newest
    ``keep_last``. ``state`` must be JSON-serialisable; ``extra_files`` are stored verbatim (and hashed)."""
    from safetensors.torch import save as st_save

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    name = f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}_", dir=root))
    try:
        files: dict[str, bytes] = {}
        tensors, aliases = model_tensors(model)
        files[MODEL_FILE] = st_save(tensors)
        optim_meta = None
        if optimizer is not None:
            opt_tensors, optim_meta = optimizer_tensors(optimizer)
            files[OPTIM_FILE] = st_save(opt_tensors)
        for fname, data in (extra_files or {}).items():
            if fname in (MODEL_FILE, OPTIM_FILE, STATE_FILE) or "/" in fname or fname.startswith("."):
                raise ValueError(f"extra file name {fname!r} is reserved or not a plain file name")
            files[fname] = data
        for fname, data in files.items():
            _write_fsync(tmp / fname, data)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "state": state or {},
            "aliases": aliases,
            "optimizer": optim_meta,
            "rng": rng_state(),
            "files": {fname: hashlib.sha256(data).hexdigest() for fname, data in files.items()},
        }
        _write_fsync(tmp / STATE_FILE, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
        _fsync_dir(tmp)
        if _before_publish is not None:
            _before_publish(tmp)
        final = root / name
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way first
            trash = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old_{name}_", dir=root))
            os.replace(final, trash / name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / LATEST_FILE, (name + "\n").encode("utf-8"))
    _prune(root, keep_last, protect=name)
    return final


def _write_fsync(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(root: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) or (p.name.startswith(f".{LATEST_FILE}.") and p.suffix == ".tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _prune(root: Path, keep_last: int, protect: str) -> None:
    steps = list_checkpoints(root)
    for path in steps[:-keep_last]:
        if path.name != protect:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- tensors
def model_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(name -> contiguous CPU copy) of the state_dict with tied tensors stored once, and alias -> name."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``"{param_id}.{key}"``) and JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}
    return tensors, meta


def _optimizer_state_dict(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """The global torch, Python and NumPy RNG states as JSON-able lists."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- reading
def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (folders ``step_*`` holding ``state.json``) under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
            if (p / STATE_FILE).is_file():
                found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``root/latest`` names, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if name.startswith(PREFIX) and "/" not in name and (root / name / STATE_FILE).is_file():
            return root / name
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder from its own path or from its root (via ``latest``); errors name the path."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
        if path.name.startswith(PREFIX):
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {STATE_FILE} is missing")
        raise CheckpointError(f"no checkpoint found in {str(path)!r} (no {LATEST_FILE} and no {PREFIX}* folder)")
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist")


def read_checkpoint_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``state.json`` of a checkpoint (format checked); errors name the file."""
    ckpt = resolve_checkpoint(path)
    state_path = ckpt / STATE_FILE
    try:
        doc = json.loads(state_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {str(state_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CheckpointError(f"checkpoint file {str(state_path)!r} is not a {FORMAT} v{VERSION} file")
    for key in ("step", "state", "files", "rng"):
        if key not in doc:
            raise CheckpointError(f"checkpoint file {str(state_path)!r} lacks the key {key!r}")
    doc["path"] = str(ckpt)
    return doc


def _read_verified(ckpt: Path, name: str, files: dict[str, str]) -> bytes:
    path = ckpt / name
    if name not in files:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no {name} (not listed in {STATE_FILE})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != files[name]:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt (its sha256 does not match {STATE_FILE})")
    return data


def read_extra_file(path: str | os.PathLike[str], name: str) -> bytes | None:
    """An extra file of a checkpoint (verified), or None when it has none of that name."""
    doc = read_checkpoint_state(path)
    if name not in doc["files"]:
        return None
    return _read_verified(Path(doc["path"]), name, doc["files"])


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint (a ``step_*`` folder or a root) into ``model`` / ``optimizer``; return its
    ``state.json`` document (``doc["state"]`` is what the writer passed as ``state``).

    Every file's sha256 is checked first; any missing, corrupt or mismatching file raises `CheckpointError`
    naming it, before the model or optimizer is touched.
    """
    from safetensors.torch import load as st_load

    doc = read_checkpoint_state(path)
    ckpt = Path(doc["path"])
    files = doc["files"]
    model_sd = optim_sd = None
    if model is not None:
        data = _read_verified(ckpt, MODEL_FILE, files)
        try:
            tensors = st_load(data)
        except Exception as exc:
            raise CheckpointError(f"checkpoint file {str(ckpt / MODEL_FILE)!r} is unreadable: {exc}") from exc
        for alias, target in doc.get("aliases", {}).items():
            tensors[alias] = tensors[target]
        expected = set(model.state_dict())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise CheckpointError(
                f"checkpoint file {str(ckpt / MODEL_FILE)!r} does not match the model: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for name, t in model.state_dict().items():
            if tensors[name].shape != t.shape:
                raise CheckpointError(
                    f"checkpoint file {str(ckpt / MODEL_FILE)!r}: {name} has shape "
                    f"{tuple(tensors[name].shape)}, the model {tuple(t.shape)}"
                )
        model_sd = tensors
    if optimizer is not None:
        if doc.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {str(ckpt)!r} holds no optimizer state")
        data = _read_verified(ckpt, OPTIM_FILE, files)
        try:
            opt_tensors = st_load(data)
        except Exception as exc:
            raise CheckpointError(f"checkpoint file {str(ckpt / OPTIM_FILE)!r} is unreadable: {exc}") from exc
        optim_sd = _optimizer_state_dict(opt_tensors, doc["optimizer"])
        if len(optim_sd["param_groups"]) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(optim_sd["param_groups"], optimizer.param_groups, strict=True)
        ):
            raise CheckpointError(
                f"checkpoint file {str(ckpt / OPTIM_FILE)!r} does not match the optimizer's parameter groups"
            )
    if model_sd is not None:
        model.load_state_dict(model_sd, strict=True)
    if optim_sd is not None:
        optimizer.load_state_dict(optim_sd)
    if restore_rng:
        set_rng_state(doc["rng"])
    return doc


def load_lm_checkpoint(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A ``MoETransformerLM`` rebuilt from a trainer checkpoint (its ``model_config`` and, after DynMoE
    changes, the per-layer E in ``moe_experts``) with the weights loaded; returns (model in eval mode, doc)."""
    from moekit.models import LMConfig, MoETransformerLM

    doc = read_checkpoint_state(path)
    state = doc["state"]
    where = f"checkpoint file {str(Path(doc['path']) / STATE_FILE)!r}"
    if not isinstance(state, dict) or not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{where} holds no model_config (not a moekit LM checkpoint)")
    try:
        model = MoETransformerLM(LMConfig.from_dict(state["model_config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad model_config: {exc}") from exc
    experts = state.get("moe_experts")
    if experts:
        try:
            model.resize_experts(dict(experts) if isinstance(experts, dict) else experts)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: bad moe_experts: {exc}") from exc
    doc = load_checkpoint(doc["path"], model)
    return model.eval(), doc
