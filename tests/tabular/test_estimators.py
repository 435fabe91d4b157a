"""MoEClassifier / MoERegressor: scikit-learn's estimator checks, pipelines, grid search, pandas, routing, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine, make_regression
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from moekit.tabular import MoEClassifier, MoERegressor, expected_failed_checks

pd = pytest.importorskip("pandas")

FAST = dict(max_epochs=15, random_state=0)


@parametrize_with_checks(
    [
        MoEClassifier(**FAST),
        MoERegressor(**FAST),
        MoEClassifier(experts=["linear", (8,)], routing="topk", k=1, **FAST),  # user-spec list: dispatch path
        MoERegressor(routing="topk", k=2, shared_expert=None, **FAST),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_expected_failed_checks_is_empty():
    assert expected_failed_checks(MoEClassifier()) == {}


@pytest.fixture(scope="module")
def wine():
    return load_wine(return_X_y=True, as_frame=True)


def test_classifier_learns_and_predicts_probabilities(wine):
    X, y = wine
    clf = MoEClassifier(random_state=0).fit(X, y)
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert list(clf.classes_) == [0, 1, 2]
    assert clf.score(X, y) > 0.95
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])


def test_string_labels_and_pandas_feature_names(wine):
    X, y = wine
    labels = y.map({0: "a", 1: "b", 2: "c"})
    clf = MoEClassifier(**FAST).fit(X, labels)
    assert list(clf.feature_names_in_) == list(X.columns)
    assert set(clf.predict(X)) <= {"a", "b", "c"}
    with pytest.raises(ValueError, match="feature names"):
        clf.predict(X[X.columns[::-1]])


def test_regressor_in_pipeline_with_cross_validation():
    X, y = load_diabetes(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), MoERegressor(max_epochs=60, random_state=0))
    scores = cross_val_score(pipe, X, y, cv=3, scoring="r2")
    assert scores.mean() > 0.4  # Ridge gets ~0.48 here


def test_grid_search_over_routing_and_experts():
    X, y = load_breast_cancer(return_X_y=True)
    X, y = X[::3], y[::3]
    grid = GridSearchCV(
        make_pipeline(StandardScaler(), MoEClassifier(**FAST)),
        {"moeclassifier__routing": ["soft", "topk"], "moeclassifier__experts": ["linear", "mlp"]},
        cv=2,
    )
    grid.fit(X, y)
    assert grid.best_score_ > 0.9
    assert grid.best_params_["moeclassifier__routing"] in ("soft", "topk")


def test_multi_output_regression():
    X, y = make_regression(n_samples=120, n_features=5, n_targets=3, random_state=0)
    reg = MoERegressor(**FAST).fit(X, y)
    assert reg.predict(X).shape == (120, 3) and reg.n_outputs_ == 3
    assert MoERegressor(**FAST).fit(X, y[:, 0]).predict(X).shape == (120,)


@pytest.mark.parametrize("routing, k", [("soft", 2), ("topk", 1), ("topk", 2)])
def test_routing_exposed(wine, routing, k):
    X, y = wine
    clf = MoEClassifier(n_experts=3, routing=routing, k=k, **FAST).fit(X, y)
    top = clf.predict_expert(X)
    assert top.shape == (len(X),) and top.min() >= 0 and top.max() < 3
    gates = clf.predict_gates(X)
    assert gates.shape == (len(X), 3)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(gates.argmax(axis=1), top)
    if routing == "topk":
        assert ((gates > 0).sum(axis=1) <= k).all()
    else:
        assert (gates > 0).all()
    assert clf.expert_share_.shape == (3,)
    assert clf.expert_share_.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(clf.expert_share_, np.bincount(top, minlength=3) / len(X))


def test_reproducible_with_random_state(wine):
    X, y = wine
    a = MoERegressor(**FAST).fit(X, y).predict(X)
    b = MoERegressor(**FAST).fit(X, y).predict(X)
    c = MoERegressor(max_epochs=15, random_state=1).fit(X, y).predict(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fit_leaves_torch_state_alone(wine):
    X, y = wine
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    MoEClassifier(**FAST).fit(X, y)
    assert torch.equal(torch.rand(3), expected)  # the global RNG is forked, not consumed
    assert torch.get_num_threads() == threads


def test_user_module_experts_are_copied_not_trained(wine):
    X, y = wine
    module = nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3))
    before = [p.detach().clone() for p in module.parameters()]
    clf = MoEClassifier(experts=[module, "linear"], **FAST).fit(X, y)
    assert clf.score(X, y) > 0.8
    for p, q in zip(module.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert clf.get_params()["experts"][0] is module


def test_no_early_stopping_and_minibatches(wine):
    X, y = wine
    clf = MoEClassifier(early_stopping=False, batch_size=32, max_epochs=5, random_state=0).fit(X, y)
    assert clf.n_iter_ == 5 and clf.validation_loss_curve_ == [] and len(clf.loss_curve_) == 5


# ---------------------------------------------------------------------------------------------- bad input
def test_empty_expert_list():
    with pytest.raises(ValueError, match="empty list"):
        MoEClassifier(experts=[]).fit(np.random.rand(20, 3), np.arange(20) % 2)


def test_mismatched_expert_widths():
    X, y = np.random.rand(30, 4), np.arange(30) % 3
    with pytest.raises(ValueError, match=r"experts\[1\] must map \(n, 4\) to \(n, 3\).*fails on input of width 4"):
        MoEClassifier(experts=["linear", nn.Linear(5, 3)], **FAST).fit(X, y)
    with pytest.raises(ValueError, match=r"experts\[0\] must map \(n, 4\) to \(n, 3\).*got \(2, 2\)"):
        MoEClassifier(experts=[nn.Linear(4, 2)], **FAST).fit(X, y)
    with pytest.raises(ValueError, match=r"experts\[0\] must be a tuple of positive ints"):
        MoERegressor(experts=[(8, 0)], **FAST).fit(X, y.astype(float))


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(n_experts=3, experts=["linear", "mlp"]), "n_experts=3 but experts lists 2"),
        (dict(n_experts=0), "n_experts must be an int >= 1"),
        (dict(experts="tree"), "experts must be one of"),
        (dict(routing="hash"), "routing must be one of"),
        (dict(routing="topk", k=5), r"k must be <= the number of experts \(4\)"),
        (dict(validation_fraction=1.5), "validation_fraction"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_epochs=0), "max_epochs"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(shared_expert="mlp"), "shared_expert"),
        (dict(hidden_sizes="64"), "hidden_sizes"),
    ],
)
def test_bad_parameters_fail_in_fit(params, match):
    est = MoERegressor(**params)  # construction never validates (sklearn convention)
    with pytest.raises(ValueError, match=match):
        est.fit(np.random.rand(20, 3), np.random.rand(20))


def test_bad_data():
    X, y = np.random.rand(20, 3), np.arange(20) % 2
    with pytest.raises(NotFittedError):
        MoEClassifier().predict(X)
    with pytest.raises(NotFittedError):
        MoERegressor().predict_expert(X)
    X_nan = X.copy()
    X_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MoEClassifier(**FAST).fit(X_nan, y)
    clf = MoEClassifier(**FAST).fit(X, y)
    with pytest.raises(ValueError, match="3 features"):
        clf.predict(np.random.rand(5, 4))
    with pytest.raises(ValueError, match="at least 2 classes"):
        MoEClassifier(**FAST).fit(X, np.zeros(20))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        MoEClassifier(**FAST).fit(X, y[:-1])
    with pytest.raises(ValueError, match="Unknown label type"):
        MoEClassifier(**FAST).fit(X, np.random.rand(20))


def test_no_warnings_on_clean_fit(wine):
    X, y = wine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEClassifier(**FAST).fit(X, y).predict_proba(X)
