"""Discriminative mixture of experts.

- ``MoEClassifier`` / ``MoERegressor``: tabular MoE with the scikit-learn API (needs the ``tabular`` extra).
- Hecto (``moekit.tabular.hecto``): GRU and FFN experts behind one top-1 gate; ``run_hecto_experiment``.
- TabMoE (``moekit.tabular.tabmoe``): functional table-QA experts, hard-EM router; ``run_tabmoe_experiment``.
- Model federation (``moekit.tabular.federation``): whole models as lazily loaded ``Expert``s behind a ``Router``.
"""

from moekit.tabular.estimators import MoEClassifier, MoERegressor, expected_failed_checks
from moekit.tabular.federation import Expert, Federation, Router
from moekit.tabular.hecto import HectoClassifier, run_hecto_experiment
from moekit.tabular.tabmoe import TabMoE, run_tabmoe_experiment

__all__ = [
    "Expert",
    "Federation",
    "HectoClassifier",
    "MoEClassifier",
    "MoERegressor",
    "Router",
    "TabMoE",
    "expected_failed_checks",
    "run_hecto_experiment",
    "run_tabmoe_experiment",
]
