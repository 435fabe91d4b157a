"""Experts: grouped FFNs (HF 3-D layout), shared experts, heterogeneous expert lists."""

from moekit.experts.grouped import GroupedFFN
from moekit.experts.heterogeneous import ExpertList, FFNExpert, GRUExpert
from moekit.experts.shared import SharedExperts

__all__ = ["ExpertList", "FFNExpert", "GRUExpert", "GroupedFFN", "SharedExperts"]
