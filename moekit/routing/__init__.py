"""Routers: one file per family, all producing a `Routing`."""

from moekit.routing.base import Router, Routing
from moekit.routing.registry import available_routers, build_router
from moekit.routing.topk import TopKRouter

__all__ = ["Router", "Routing", "TopKRouter", "available_routers", "build_router"]
