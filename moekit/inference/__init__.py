"""Edge inference: MoE experts on disk, a memory budget, expert caches and prefetch.

Build a store from a model, then serve it under a budget::

    from moekit.inference import EdgeModel, build_expert_store
    build_expert_store(model, "store/", usage=usage)        # experts -> safetensors files + manifest
    edge = EdgeModel("store/", memory_budget="25%", cache="committee", prefetch=True)
    edge.generate(prompt, 32, temperature=0.0)
"""

from moekit.inference.budget import BudgetError, format_bytes, parse_budget
from moekit.inference.cache import (
    POLICIES,
    CacheStats,
    ExpertCache,
    choose_committee,
    committee_from_usage,
    make_policy,
    simulate,
)
from moekit.inference.offloaded import OffloadedExperts
from moekit.inference.prefetch import Prefetcher
from moekit.inference.runtime import (
    CACHE_MODES,
    EdgeModel,
    RoutingRecord,
    decode_stream,
    ensure_store,
    min_call_bytes,
    record_routing,
)
from moekit.inference.store import ExpertStore, StoreError, build_expert_store, drop_page_cache
from moekit.inference.telemetry import Telemetry

__all__ = [
    "CACHE_MODES",
    "POLICIES",
    "BudgetError",
    "CacheStats",
    "EdgeModel",
    "ExpertCache",
    "ExpertStore",
    "OffloadedExperts",
    "Prefetcher",
    "RoutingRecord",
    "StoreError",
    "Telemetry",
    "build_expert_store",
    "choose_committee",
    "committee_from_usage",
    "decode_stream",
    "drop_page_cache",
    "ensure_store",
    "format_bytes",
    "make_policy",
    "min_call_bytes",
    "parse_budget",
    "record_routing",
    "simulate",
]
