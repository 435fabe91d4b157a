"""Tabular mixture of experts with a scikit-learn API: ``MoEClassifier`` and ``MoERegressor``.

Needs the ``tabular`` extra (scikit-learn; pandas for DataFrame input).
"""

from moekit.tabular.estimators import MoEClassifier, MoERegressor, expected_failed_checks

__all__ = ["MoEClassifier", "MoERegressor", "expected_failed_checks"]
