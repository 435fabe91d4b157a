"""Dispatch: group token-expert pairs by expert (dropless or with capacity) and run grouped GEMMs."""

from moekit.dispatch.backends import available_backends, grouped_linear
from moekit.dispatch.plan import DispatchPlan, expert_capacity, plan_capacity, plan_dropless

__all__ = [
    "DispatchPlan",
    "available_backends",
    "expert_capacity",
    "grouped_linear",
    "plan_capacity",
    "plan_dropless",
]
