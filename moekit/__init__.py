"""moekit: Mixture-of-Experts end to end."""

from moekit import reference
from moekit.layer import MoELayer
from moekit.output import MoEOutput
from moekit.routing import Router, Routing, TopKRouter, available_routers, build_router

__version__ = "0.1.0"

__all__ = [
    "MoELayer",
    "MoEOutput",
    "Router",
    "Routing",
    "TopKRouter",
    "available_routers",
    "build_router",
    "reference",
]
