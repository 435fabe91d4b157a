"""Memory budgets: parsing, and the clear error below one layer's active experts."""

from __future__ import annotations

import pytest

from moekit.inference import BudgetError, EdgeModel, format_bytes, min_call_bytes, parse_budget
from moekit.inference.store import ExpertStore


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("25%", 250),
        ("100%", 1000),
        (0.5, 500),
        (123, 123),
        ("2KB", 2000),
        ("1KiB", 1024),
        (" 1.5 mb ", 1_500_000),
    ],
)
def test_parse_budget(spec, expected):
    assert parse_budget(spec, 1000) == expected


@pytest.mark.parametrize("spec", ["0%", "150%", "-3", "abc", "12 parsecs", 0, 1.5, True, None, "0.1%"])
def test_parse_budget_rejects(spec):
    with pytest.raises(BudgetError):
        parse_budget(spec, 100)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.00 MiB"


def test_budget_below_one_layer_states_the_minimum(store_dir):
    store = ExpertStore(store_dir)
    minimum = min_call_bytes(store)
    assert minimum == 2 * store.nbytes((0, 0))  # k = 2 experts of equal size
    with pytest.raises(BudgetError, match=rf"minimum is .*\({minimum} bytes"):
        EdgeModel(store, memory_budget=minimum - 1)
    EdgeModel(store, memory_budget=minimum).close()  # exactly the minimum works
