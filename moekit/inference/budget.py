"""Memory budgets for expert weights: parse ``"25%"`` / ``"64MB"`` / bytes, check minimums, format sizes."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SPEC = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


class BudgetError(ValueError):
    """A memory budget that cannot be parsed or is too small to run the model."""


def parse_budget(spec: str | int | float, total_expert_bytes: int) -> int:
    """Bytes of expert weights that may be resident.

    ``spec``: an int (bytes), a string with a unit (``"64MB"``, ``"1.5GiB"``, ``"4096"``), or a share of all
    expert bytes (``"25%"``; a float in (0, 1] means the same share). Shares round down to whole bytes.
    """
    if isinstance(spec, bool):
        raise BudgetError(f"memory budget must be bytes, a size string or a share like '25%', got {spec!r}")
    if isinstance(spec, int):
        value = spec
    elif isinstance(spec, float):
        if not 0 < spec <= 1:
            raise BudgetError(f"a float memory budget is a share of expert bytes in (0, 1], got {spec}")
        value = math.floor(spec * total_expert_bytes)
    elif isinstance(spec, str):
        match = _SPEC.match(spec)
        if match is None:
            raise BudgetError(f"cannot parse memory budget {spec!r} (examples: '25%', '64MB', '1.5GiB', 4096)")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise BudgetError(f"a percentage memory budget must lie in (0, 100], got {spec!r}")
            value = math.floor(number / 100 * total_expert_bytes)
        elif unit in _UNITS:
            value = math.floor(number * _UNITS[unit])
        else:
            raise BudgetError(f"unknown unit {match.group(2)!r} in memory budget {spec!r} (use B, MB, MiB, GB, ...)")
    else:
        raise BudgetError(f"memory budget must be bytes, a size string or a share like '25%', got {spec!r}")
    if value <= 0:
        raise BudgetError(f"memory budget must be > 0 bytes, got {spec!r}")
    return int(value)


def check_budget(budget_bytes: int, min_bytes: int, total_expert_bytes: int, why: str) -> None:
    """Raise ``BudgetError`` stating the minimum when ``budget_bytes < min_bytes``."""
    if budget_bytes < min_bytes:
        share = ""
        if total_expert_bytes > 0:
            share = f", {min_bytes / total_expert_bytes:.1%} of all expert bytes"
        raise BudgetError(
            f"memory budget {format_bytes(budget_bytes)} is too small: {why}, so the minimum is "
            f"{format_bytes(min_bytes)} ({min_bytes} bytes{share})"
        )


def format_bytes(n: float) -> str:
    """Human-readable size with binary units: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover
