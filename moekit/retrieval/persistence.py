"""Safe on-disk bundles: safetensors tensors + JSON records, tied together by a checksummed JSON manifest.

Layout of a bundle folder::

    manifest.json                    # format, version, meta, file names + sizes + sha256, own checksum
    tensors-<sha12>.safetensors      # numeric arrays (no pickle anywhere)
    records-<sha12>.json             # JSON-able records (texts, names)

Writes are atomic and ordered: the data files (content-addressed names) first, the manifest last by rename,
so a reader sees either the old bundle or the new one, never a mix; stale data files are removed afterwards.
Reads verify the manifest checksum and every file's size and sha256 before parsing: a truncated or
tampered bundle raises `IndexFormatError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moekit.atomic_io import atomic_write_bytes

FORMAT = "moekit.retrieval.bundle"
VERSION = 1
MANIFEST = "manifest.json"
_PREFIXES = ("tensors-", "records-")


class IndexFormatError(ValueError):
    """A bundle on disk is missing, truncated, tampered with or of an unknown format."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_bundle(
    directory: str | os.PathLike[str],
    tensors: dict[str, np.ndarray],
    records: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write a bundle to ``directory`` (created if needed); returns the manifest path."""
    from safetensors.numpy import save

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} exists and is not a folder")
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    tensor_bytes = save(arrays)
    record_bytes = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    files = {}
    for key, prefix, suffix, data in (
        ("tensors", "tensors-", ".safetensors", tensor_bytes),
        ("records", "records-", ".json", record_bytes),
    ):
        digest = sha256(data)
        name = f"{prefix}{digest[:12]}{suffix}"
        atomic_write_bytes(directory / name, data)
        files[key] = {"name": name, "bytes": len(data), "sha256": digest}
    body = {"format": FORMAT, "version": VERSION, "meta": meta, "files": files}
    manifest = {**body, "checksum": sha256(_canonical(body))}
    atomic_write_bytes(directory / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    keep = {f["name"] for f in files.values()}
    for p in directory.iterdir():
        if p.name.startswith(_PREFIXES) and p.name not in keep and p.is_file():
            p.unlink(missing_ok=True)
    return directory / MANIFEST


def load_bundle(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """Read and verify a bundle: (tensors, records, meta). Raises `IndexFormatError` on any inconsistency."""
    from safetensors.numpy import load

    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"no index at {str(directory)!r}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{str(path)!r} is not valid JSON (truncated or corrupted): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{str(path)!r} is not a moekit retrieval index manifest")
    if manifest.get("version") != VERSION:
        raise IndexFormatError(f"{str(path)!r} has version {manifest.get('version')!r}, expected {VERSION}")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    if manifest.get("checksum") != sha256(_canonical(body)):
        raise IndexFormatError(f"{str(path)!r} fails its checksum (edited or corrupted)")
    blobs: dict[str, bytes] = {}
    for key in ("tensors", "records"):
        info = manifest["files"].get(key) if isinstance(manifest.get("files"), dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            raise IndexFormatError(f"{str(path)!r} does not list its {key} file")
        fpath = directory / Path(info["name"]).name
        if not fpath.is_file():
            raise IndexFormatError(f"index file {str(fpath)!r} is missing")
        data = fpath.read_bytes()
        if len(data) != info.get("bytes"):
            raise IndexFormatError(
                f"index file {str(fpath)!r} has {len(data)} bytes, expected {info.get('bytes')} (truncated?)"
            )
        if sha256(data) != info.get("sha256"):
            raise IndexFormatError(f"index file {str(fpath)!r} fails its sha256 checksum (tampered or corrupted)")
        blobs[key] = data
    try:
        tensors = load(blobs["tensors"])
        records = json.loads(blobs["records"].decode("utf-8"))
    except Exception as exc:  # verified bytes that still do not parse: a bundle written by something else
        raise IndexFormatError(f"index at {str(directory)!r} could not be parsed: {exc}") from exc
    return tensors, records, manifest["meta"]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
