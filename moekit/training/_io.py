"""Atomic file writes for run outputs: temp file in the target folder, fsync, ``os.replace``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from moekit.atomic_io import atomic_write_text


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """JSON with NaN / inf written as null (strict JSON), tuples as lists, paths as strings."""
    text = json.dumps(sanitize(obj), indent=1, allow_nan=False, default=_default)
    return atomic_write_text(path, text + "\n")


def sanitize(obj: Any) -> Any:
    """A copy of ``obj`` with non-finite floats replaced by None (recursively through dicts and lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


def _default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
