"""Benchmarks: ``moekit bench <name>`` runs one, prints a table and writes ``benchmarks/results/<name>.json``.

Shared timing, table and JSON helpers live in ``moekit.bench.common``; each benchmark is one module exposing
``run_<name>_bench(quick, json_path, ...) -> dict``. Nothing is imported eagerly, so that importing
``moekit.bench.common`` from anywhere in moekit pulls in no benchmark (and no import cycle).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LayerBenchConfig", "LayerCase", "run_layer_bench"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moekit.bench import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'moekit.bench' has no attribute {name!r}")
