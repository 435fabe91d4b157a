"""Markdown reports of training runs: a summary table, embedded plots, extra sections."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moekit.atomic_io import atomic_write_text


def fmt(value: Any, spec: str = ".4g") -> str:
    """A table cell: ``-`` for None / NaN, ints with thousands separators, floats with ``spec``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (cells formatted with `fmt`, pipes escaped)."""

    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def image_section(title: str, images: Mapping[str, str | os.PathLike[str]], base: Path) -> str:
    """``### caption`` + ``![caption](relative/path.png)`` for each image that exists."""
    lines = [f"## {title}", ""]
    for caption, path in images.items():
        p = Path(path)
        if p.is_file():
            rel = os.path.relpath(p, base)
            lines += [f"### {caption}", "", f"![{caption}]({Path(rel).as_posix()})", ""]
    return "\n".join(lines) + "\n"


def write_report(path: str | os.PathLike[str], title: str, sections: Sequence[str]) -> Path:
    """Write ``# title`` and the sections (markdown strings) to ``path`` atomically."""
    text = f"# {title}\n\n" + "\n".join(s.rstrip() + "\n" for s in sections if s)
    return atomic_write_text(path, text)
