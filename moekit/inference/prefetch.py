"""Prefetch: guess the next MoE layer's experts from the current hidden state and load them in the background.

While MoE layer ``l`` computes, layer ``l + 1``'s router is applied to layer ``l``'s input rows (the hidden
state one block early); the experts it picks are loaded by one I/O thread (one storage queue). The guess is
checked against the experts layer ``l + 1`` really uses (recall and precision in the telemetry).

A wrong guess costs a read and evicts an expert that may be needed, so loads are issued only for layers whose
recent precision (an exponential moving average, starting at 1) is at least ``min_precision``; predictions
are still made and scored for the others, so a layer whose guesses improve is prefetched again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from moekit.inference.cache import ExpertCache, Key
from moekit.inference.telemetry import Telemetry
from moekit.routing.base import Router, fp32_logits
from moekit.routing.topk import TopKRouter


class Prefetcher:
    """Predicts and prefetches layer ``l + 1``'s experts during layer ``l``.

    Args:
        routers: the router of every MoE layer (None where it cannot be applied early, e.g. hash routing).
        cache: the expert cache the loads go into (prefetch never evicts locked or pinned experts).
        load: ``load(key)`` reads one expert (runs on the I/O thread).
        telemetry: receives prediction recall and precision.
        min_precision: issue loads for a layer only while its recent precision is at least this (0: always).
        smoothing: weight of the newest call in the precision average.
    """

    def __init__(
        self,
        routers: Sequence[Router | None],
        cache: ExpertCache,
        load: Callable[[Key], Any],
        telemetry: Telemetry,
        min_precision: float = 0.5,
        smoothing: float = 0.1,
    ) -> None:
        if not 0 <= min_precision <= 1 or not 0 < smoothing <= 1:
            raise ValueError(f"need 0 <= min_precision <= 1 and 0 < smoothing <= 1, got {min_precision}, {smoothing}")
        self.routers = list(routers)
        self.cache, self.load, self.telemetry = cache, load, telemetry
        self.min_precision, self.smoothing = min_precision, smoothing
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self.predicted: dict[int, set[int]] = {}
        self.precision = [1.0] * len(self.routers)  # moving average per layer

    def observe(self, layer: int, used: Sequence[int]) -> None:
        """Layer ``layer`` starts a call using ``used``: score the prediction made for it, if any."""
        predicted = self.predicted.pop(layer, None)
        if predicted:
            hits = len(predicted & set(used))
            self.telemetry.record_prediction(predicted, set(used))
            a = self.smoothing
            self.precision[layer] = (1 - a) * self.precision[layer] + a * hits / len(predicted)

    @torch.no_grad()
    def predict(self, layer: int, x: Tensor, limit: int) -> list[int]:
        """Experts of layer ``layer + 1`` for the rows x (S, D), most-voted first, at most ``limit``."""
        nxt = layer + 1
        if nxt >= len(self.routers) or self.routers[nxt] is None or x.shape[0] == 0 or limit < 1:
            return []
        router = self.routers[nxt]
        if type(router) is TopKRouter:  # fast path: the top-k logits pick the same experts
            chosen = fp32_logits(x, router.weight, router.bias).topk(router.k, dim=-1).indices  # (S, k)
        else:
            chosen = router(x).expert_idx  # (P,)
        votes = torch.bincount(chosen.reshape(-1), minlength=router.num_experts)  # (E,)
        order = torch.argsort(votes, descending=True, stable=True)[:limit].tolist()
        counts = votes.tolist()
        experts = [e for e in order if counts[e] > 0]
        self.predicted[nxt] = set(experts)
        return experts

    def prefetch(self, layer: int, x: Tensor, limit: int) -> list[Key]:
        """Predict layer ``layer + 1``'s experts from x (S, D), start loading them; returns keys started."""
        experts = self.predict(layer, x, limit)
        if not experts or self.precision[layer + 1] < self.min_precision:
            return []
        keys = [(layer + 1, e) for e in experts]
        return self.cache.prefetch(keys, self._submit)

    def _submit(self, key: Key) -> Future:
        return self.executor.submit(self.load, key)

    def close(self) -> None:
        """Stop the I/O thread (queued loads are cancelled)."""
        self.executor.shutdown(wait=True, cancel_futures=True)
