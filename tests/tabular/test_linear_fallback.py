"""The tabular MoE keeps its gated experts only when they beat the linear fit beyond validation noise."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge

from moekit.tabular import MoEClassifier, MoERegressor


def test_linear_problem_falls_back_to_the_linear_fit_of_every_row():
    rng = np.random.RandomState(0)
    X = rng.randn(300, 4)
    y = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.5 * rng.randn(300)
    moe = MoERegressor(max_epochs=30, random_state=0).fit(X, y)
    assert not moe.experts_kept_
    ridge = Ridge(alpha=1.0).fit((X - X.mean(0)) / X.std(0), y)  # the MoE standardises X internally
    np.testing.assert_allclose(moe.predict(X), ridge.predict((X - X.mean(0)) / X.std(0)), atol=1e-3)


def test_nonlinear_problem_keeps_the_experts():
    rng = np.random.RandomState(0)
    X = rng.uniform(-1, 1, (400, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR: no linear model does better than chance
    clf = MoEClassifier(max_epochs=200, random_state=0).fit(X, y)
    assert clf.experts_kept_
    linear = LogisticRegression().fit(X, y).score(X, y)
    assert clf.score(X, y) > max(0.9, linear + 0.2)
