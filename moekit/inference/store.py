"""Expert store: every expert's weights in its own safetensors file, read on demand; a JSON manifest.

Layout of a store directory::

    manifest.json                         sizes, sha256 checksums, model description, optional usage counts
    resident.safetensors                  every non-expert weight (always resident)
    experts/l000/e0000.safetensors        expert 0 of MoE layer 0: gate_up_proj (2F, D), down_proj (D, F)
    ...                                   (int8 stores add gate_up_proj.scale (2F,), down_proj.scale (D,))

Files are written atomically (temporary file + fsync + rename) and the manifest last, so a store is either
complete or has no manifest. Opening a store checks that every file exists with its recorded size; the sha256
of an expert file is checked when it is first read (``checksums="first"``), on every read (``"always"``) or
never. A missing, truncated or tampered file raises ``StoreError`` naming it.

Reads can be throttled to emulate slow storage (``storage_mbps``) and the page cache dropped for the store's
files (``drop_page_cache``), so measured runs read from the device rather than from RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from moekit.atomic_io import atomic_write_bytes, atomic_write_text
from moekit.experts.grouped import GroupedFFN
from moekit.inference.quantize import SCALE_SUFFIX, check_quantization, quantize_expert
from moekit.layer import MoELayer

FORMAT = "moekit-expert-store"
VERSION = 1
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
CHECKSUM_MODES = ("first", "always", "never")

Key = tuple[int, int]  # (MoE layer index, expert index)


class StoreError(RuntimeError):
    """A store that is missing, incomplete or corrupt; the message names the file."""


@dataclass(frozen=True)
class ExpertFile:
    """One expert's file: path relative to the store, its size on disk, its tensor bytes and sha256."""

    file: str
    file_bytes: int
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class LayerInfo:
    """One MoE layer of the stored model."""

    index: int
    module: str  # name in ``model.named_modules()``
    num_experts: int
    k: int
    d_model: int
    d_ff: int
    activation: str
    experts: tuple[ExpertFile, ...]


# ------------------------------------------------------------------------------------------------ throttle


class StorageThrottle:
    """Emulates a storage device of ``mbps`` MB/s (10**6 bytes/s): reads queue on one device, each taking
    ``bytes / rate`` seconds of device time; a read returns no earlier than its emulated completion."""

    def __init__(self, mbps: float) -> None:
        if isinstance(mbps, bool) or not isinstance(mbps, (int, float)) or not mbps > 0:
            raise ValueError(f"storage_mbps must be a number > 0, got {mbps!r}")
        self.mbps = float(mbps)
        self._rate = self.mbps * 1e6  # bytes per second
        self._lock = threading.Lock()
        self._free_at = 0.0

    def reserve(self, nbytes: int) -> float:
        """Book ``nbytes`` on the device; returns the ``time.perf_counter()`` at which the read completes."""
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + nbytes / self._rate
            return self._free_at


def drop_page_cache(paths: list[Path]) -> int:
    """Ask the kernel to drop cached pages of ``paths`` (``POSIX_FADV_DONTNEED``); returns files dropped.

    Returns 0 where ``posix_fadvise`` does not exist (non-POSIX). Dirty pages are synced first.
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    dropped = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += 1
        finally:
            os.close(fd)
    return dropped


# ------------------------------------------------------------------------------------------------ building


def moe_layers_of(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name, layer) of every ``MoELayer`` in ``model``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def model_description(model: nn.Module) -> dict[str, Any]:
    """What ``open_model`` needs to rebuild the model: type and config for a ``MoETransformerLM``."""
    from moekit.models.lm import MoETransformerLM

    if isinstance(model, MoETransformerLM):
        return {"type": "moekit.MoETransformerLM", "config": model.config.to_dict()}
    return {"type": f"{type(model).__module__}.{type(model).__qualname__}"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def build_expert_store(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    quantization: str | None = None,
    usage: list[list[int]] | None = None,
    description: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ExpertStore:
    """Write ``model``'s experts (one file each), its other weights and a manifest to ``out_dir``.

    ``model`` is any module whose MoE FFNs are ``MoELayer`` with ``GroupedFFN`` experts (a
    ``MoETransformerLM``, or a Hugging Face model after ``moekit.interop`` put moekit layers in it).
    ``quantization="int8"`` stores per-channel int8 experts. ``usage[l][e]`` (tokens routed to each expert on
    calibration data) is kept in the manifest for the "committee" cache policy.
    """
    check_quantization(quantization)
    root = Path(out_dir)
    if (root / MANIFEST).exists() and not overwrite:
        raise StoreError(f"{root / MANIFEST} exists already; pass overwrite=True to replace the store")
    layers = moe_layers_of(model)
    if not layers:
        raise ValueError("model has no MoELayer: nothing to offload")
    manifest_layers = []
    expert_storages: set[int] = set()  # expert tensors are found by storage, whatever names state_dict uses
    total = 0
    for li, (name, layer) in enumerate(layers):
        experts = layer.experts
        if not isinstance(experts, GroupedFFN):
            raise TypeError(f"{name}.experts is {type(experts).__name__}; the expert store needs GroupedFFN experts")
        expert_storages.update(p.untyped_storage().data_ptr() for p in experts.parameters())
        files = []
        for e in range(experts.num_experts):
            tensors = {n: t.detach().contiguous().clone() for n, t in experts.expert_parameters(e).items()}
            if quantization == "int8":
                tensors = quantize_expert(tensors)
            rel = f"experts/l{li:03d}/e{e:04d}.safetensors"
            data = safetensors.torch.save(tensors, metadata={"format": FORMAT, "layer": str(li), "expert": str(e)})
            atomic_write_bytes(root / rel, data)
            nbytes = _tensor_bytes(tensors)
            total += nbytes
            files.append({"file": rel, "file_bytes": len(data), "nbytes": nbytes, "sha256": _sha256(data)})
        manifest_layers.append(
            {
                "index": li,
                "module": name,
                "num_experts": experts.num_experts,
                "k": layer.k,
                "d_model": experts.d_model,
                "d_ff": experts.d_ff,
                "activation": experts.activation,
                "experts": files,
            }
        )
    resident = {
        n: t.detach().contiguous().clone()  # clones: tied weights must not share memory in safetensors
        for n, t in model.state_dict().items()
        if t.untyped_storage().data_ptr() not in expert_storages
    }
    data = safetensors.torch.save(resident, metadata={"format": FORMAT})
    atomic_write_bytes(root / RESIDENT, data)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "quantization": quantization,
        "model": description if description is not None else model_description(model),
        "resident": {
            "file": RESIDENT,
            "file_bytes": len(data),
            "nbytes": _tensor_bytes(resident),
            "sha256": _sha256(data),
        },
        "expert_bytes": total,
        "layers": manifest_layers,
        "usage": None,
    }
    if usage is not None:
        manifest["usage"] = {"counts": _check_usage(usage, manifest_layers)}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1))
    return ExpertStore(root)


def _check_usage(usage: list[list[int]], layers: list[dict]) -> list[list[int]]:
    if len(usage) != len(layers) or any(len(u) != lay["num_experts"] for u, lay in zip(usage, layers, strict=True)):
        raise ValueError("usage must hold one count per expert of every MoE layer")
    return [[int(c) for c in u] for u in usage]


# ------------------------------------------------------------------------------------------------ reading


class ExpertStore:
    """A store on disk (see the module doc). Thread-safe reads of single experts.

    Args:
        root: the store directory.
        checksums: verify an expert file's sha256 on its ``"first"`` read, on ``"always"`` or ``"never"``.
        storage_mbps: emulate a device of this many MB/s (None = as fast as the disk is).
    """

    def __init__(self, root: str | os.PathLike, checksums: str = "first", storage_mbps: float | None = None) -> None:
        if checksums not in CHECKSUM_MODES:
            raise ValueError(f"checksums must be one of {CHECKSUM_MODES}, got {checksums!r}")
        self.root = Path(root)
        self.checksums = checksums
        self.manifest = self._read_manifest()
        self.quantization: str | None = self.manifest.get("quantization")
        self.layers = [self._layer_info(d) for d in self.manifest["layers"]]
        self.expert_bytes = sum(f.nbytes for lay in self.layers for f in lay.experts)
        self.throttle: StorageThrottle | None = None
        self.set_storage_mbps(storage_mbps)
        self._lock = threading.Lock()
        self._verified: set[Key] = set()
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0
        self._check_files()

    # ---------------------------------------------------------------- manifest
    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.is_file():
            raise StoreError(f"no expert store at {self.root}: {path} is missing")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"cannot read the store manifest {path}: {err}") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path} is not a moekit expert-store manifest")
        if manifest.get("version") != VERSION:
            raise StoreError(f"{path} has store version {manifest.get('version')!r}; this moekit reads {VERSION}")
        for field in ("resident", "layers", "model"):
            if field not in manifest:
                raise StoreError(f"{path} lacks the field {field!r}")
        return manifest

    @staticmethod
    def _layer_info(d: dict[str, Any]) -> LayerInfo:
        experts = tuple(ExpertFile(f["file"], f["file_bytes"], f["nbytes"], f["sha256"]) for f in d["experts"])
        return LayerInfo(
            d["index"],
            d["module"],
            d["num_experts"],
            d["k"],
            d["d_model"],
            d["d_ff"],
            d["activation"],
            experts,
        )

    def _check_files(self) -> None:
        """Every file must exist with the size the manifest records (cheap; sha256 is checked on read)."""
        entries = [(self.manifest["resident"]["file"], self.manifest["resident"]["file_bytes"])]
        entries += [(f.file, f.file_bytes) for lay in self.layers for f in lay.experts]
        for rel, size in entries:
            self._check_size(self.root / rel, size)

    @staticmethod
    def _check_size(path: Path, size: int) -> None:
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"expert store file {path} is missing") from None
        if actual != size:
            what = "truncated" if actual < size else "longer than recorded"
            raise StoreError(f"expert store file {path} is {what}: {actual} bytes, the manifest says {size}")

    @property
    def model_description(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def usage(self) -> list[list[int]] | None:
        """Calibration counts ``usage[l][e]`` recorded in the manifest, or None."""
        u = self.manifest.get("usage")
        return None if u is None else u["counts"]

    def write_usage(self, usage: list[list[int]], source: str = "") -> None:
        """Record calibration counts in the manifest (atomic rewrite)."""
        self.manifest["usage"] = {"counts": _check_usage(usage, self.manifest["layers"]), "source": source}
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=1))

    # ---------------------------------------------------------------- sizes and paths
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def keys(self) -> list[Key]:
        return [(lay.index, e) for lay in self.layers for e in range(lay.num_experts)]

    def expert_file(self, key: Key) -> ExpertFile:
        layer, e = key
        if not 0 <= layer < len(self.layers) or not 0 <= e < self.layers[layer].num_experts:
            raise KeyError(f"no expert {key} in the store (layers 0..{len(self.layers) - 1})")
        return self.layers[layer].experts[e]

    def nbytes(self, key: Key) -> int:
        """Bytes the expert occupies in memory once loaded."""
        return self.expert_file(key).nbytes

    def paths(self) -> list[Path]:
        return [self.root / self.manifest["resident"]["file"]] + [
            self.root / f.file for lay in self.layers for f in lay.experts
        ]

    def set_storage_mbps(self, mbps: float | None) -> None:
        """Throttle reads to ``mbps`` MB/s from now on (None: no throttle)."""
        self.throttle = None if mbps is None else StorageThrottle(mbps)

    def drop_page_cache(self) -> int:
        """Drop the page cache of the store's files (see ``drop_page_cache``)."""
        return drop_page_cache(self.paths())

    def reset_stats(self) -> None:
        with self._lock:
            self.bytes_read, self.reads, self.read_seconds = 0, 0, 0.0

    # ---------------------------------------------------------------- reads
    def _read_file(self, path: Path, size: int, sha256: str | None) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read(size + 1)
        except FileNotFoundError:
            raise StoreError(f"expert store file {path} is missing") from None
        if len(data) != size:
            what = "truncated" if len(data) < size else "longer than recorded"
            raise StoreError(f"expert store file {path} is {what}: {len(data)} bytes, the manifest says {size}")
        if sha256 is not None:
            digest = _sha256(data)
            if digest != sha256:
                raise StoreError(
                    f"expert store file {path} is corrupt or was modified: sha256 {digest} differs from the "
                    f"manifest's {sha256}"
                )
        return data

    @staticmethod
    def _deserialize(path: Path, data: bytes) -> dict[str, Tensor]:
        try:
            return safetensors.torch.load(data)
        except Exception as err:  # safetensors raises its own error types
            raise StoreError(f"expert store file {path} is not a valid safetensors file: {err}") from err

    def load_expert(self, key: Key) -> dict[str, Tensor]:
        """Read one expert: ``{"gate_up_proj": (2F, D), "down_proj": (D, F)}`` (+ ``.scale`` for int8)."""
        info = self.expert_file(key)
        path = self.root / info.file
        start = time.perf_counter()
        done_at = self.throttle.reserve(info.file_bytes) if self.throttle is not None else 0.0
        verify = self.checksums == "always" or (self.checksums == "first" and key not in self._verified)
        data = self._read_file(path, info.file_bytes, info.sha256 if verify else None)
        tensors = self._deserialize(path, data)
        self._check_tensors(key, path, tensors)
        wait = done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            if verify:
                self._verified.add(key)
            self.bytes_read += info.file_bytes
            self.reads += 1
            self.read_seconds += time.perf_counter() - start
        return tensors

    def _check_tensors(self, key: Key, path: Path, tensors: dict[str, Tensor]) -> None:
        lay = self.layers[key[0]]
        gated = lay.activation in ("swiglu", "geglu")
        in_name = "gate_up_proj" if gated else "up_proj"
        shapes = {
            in_name: ((2 if gated else 1) * lay.d_ff, lay.d_model),
            "down_proj": (lay.d_model, lay.d_ff),
        }
        if self.quantization == "int8":
            shapes.update({n + SCALE_SUFFIX: (s[0],) for n, s in list(shapes.items())})
        got = {n: tuple(t.shape) for n, t in tensors.items()}
        if got != shapes:
            raise StoreError(f"expert store file {path} holds tensors {got}, expected {shapes}")

    def load_resident(self) -> dict[str, Tensor]:
        """The non-expert weights (sha256 always checked)."""
        res = self.manifest["resident"]
        path = self.root / res["file"]
        return self._deserialize(path, self._read_file(path, res["file_bytes"], res["sha256"]))

    def verify(self) -> None:
        """Check the sha256 of every file now (raises ``StoreError`` naming the first bad one)."""
        res = self.manifest["resident"]
        self._read_file(self.root / res["file"], res["file_bytes"], res["sha256"])
        for lay in self.layers:
            for e, f in enumerate(lay.experts):
                self._read_file(self.root / f.file, f.file_bytes, f.sha256)
                with self._lock:
                    self._verified.add((lay.index, e))
