"""Routers by name. ``build_router("topk", d_model=..., num_experts=..., k=..., **options)``.

Each entry is a plain factory so that importing moekit does not import every router family.
"""

from __future__ import annotations

from collections.abc import Callable

from moekit.routing.base import Router


def _topk(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.topk import TopKRouter

    return TopKRouter(d_model, num_experts, k, **kw)


def _mixtral(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.topk import TopKRouter

    return TopKRouter(d_model, num_experts, k, order="topk_then_softmax", **kw)


def _qwen(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.topk import TopKRouter

    kw.setdefault("renormalize", False)
    return TopKRouter(d_model, num_experts, k, order="softmax_then_topk", **kw)


def _noisy(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.noisy import NoisyTopKRouter

    return NoisyTopKRouter(d_model, num_experts, k, **kw)


def _switch(d_model: int, num_experts: int, k: int = 1, **kw) -> Router:
    from moekit.routing.switch import SwitchRouter

    if k != 1:
        raise ValueError(f"k must be 1 for router='switch' (Switch routes each token to one expert), got {k}")
    return SwitchRouter(d_model, num_experts, **kw)


def _gshard(d_model: int, num_experts: int, k: int = 2, **kw) -> Router:
    from moekit.routing.gshard import GShardRouter

    if k != 2:
        raise ValueError(f"k must be 2 for router='gshard' (GShard top-2), got {k}")
    return GShardRouter(d_model, num_experts, **kw)


def _deepseek(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.deepseek import DeepSeekRouter

    return DeepSeekRouter(d_model, num_experts, k, **kw)


def _topp(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.topp import TopPRouter

    return TopPRouter(d_model, num_experts, max_k=k, **kw)


def _expert_choice(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.expert_choice import ExpertChoiceRouter

    return ExpertChoiceRouter(d_model, num_experts, k=k, **kw)


def _hash(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.hash import HashRouter

    return HashRouter(d_model, num_experts, k, **kw)


def _sinkhorn(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.sinkhorn import SinkhornRouter

    return SinkhornRouter(d_model, num_experts, k, **kw)


def _base(d_model: int, num_experts: int, k: int = 1, **kw) -> Router:
    from moekit.routing.base_layer import BaseRouter

    if k != 1:
        raise ValueError(f"k must be 1 for router='base' (one expert per token by assignment), got {k}")
    return BaseRouter(d_model, num_experts, **kw)


def _dynmoe(d_model: int, num_experts: int, k: int, **kw) -> Router:
    from moekit.routing.dynmoe import TopAnyRouter

    return TopAnyRouter(d_model, num_experts, **kw)


ROUTERS: dict[str, Callable[..., Router]] = {
    "topk": _topk,
    "mixtral": _mixtral,
    "qwen": _qwen,
    "olmoe": _qwen,
    "noisy_topk": _noisy,
    "switch": _switch,
    "gshard": _gshard,
    "deepseek": _deepseek,
    "topp": _topp,
    "expert_choice": _expert_choice,
    "hash": _hash,
    "sinkhorn": _sinkhorn,
    "base": _base,
    "dynmoe": _dynmoe,
}


def available_routers() -> list[str]:
    """Names accepted by ``MoELayer(router=...)`` and ``build_router``."""
    return sorted(ROUTERS)


def build_router(name: str, *, d_model: int, num_experts: int, k: int, **options) -> Router:
    """Make a router by name; ``options`` go to the router's constructor."""
    if not isinstance(name, str):
        raise TypeError(f"router must be a name (str) or a Router instance, got {type(name).__name__}")
    if name not in ROUTERS:
        raise ValueError(f"router must be one of {available_routers()}, got {name!r}")
    return ROUTERS[name](d_model=d_model, num_experts=num_experts, k=k, **options)
