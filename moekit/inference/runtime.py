"""The edge runtime: a model whose experts live on disk, under a memory budget, with a cache and prefetch.

    edge = EdgeModel("store/", memory_budget="25%", cache="committee", prefetch=True, storage_mbps=100)
    out = edge.generate(prompt, 32, temperature=0.0)      # same tokens as the fully resident model
    edge.summary()                                          # hit rates, bytes read, prefetch recall, tokens/s

Non-expert weights are loaded once and stay resident; every ``MoELayer.experts`` is replaced by an
``OffloadedExperts`` that fetches experts through one shared ``ExpertCache``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.inference.budget import parse_budget
from moekit.inference.cache import (
    POLICIES,
    CachePolicy,
    CacheStats,
    ExpertCache,
    Key,
    TraceCall,
    choose_committee,
    make_policy,
)
from moekit.inference.offloaded import OffloadedExperts
from moekit.inference.prefetch import Prefetcher
from moekit.inference.store import MANIFEST, ExpertStore, StoreError, build_expert_store, moe_layers_of
from moekit.inference.telemetry import Telemetry, summarize

CACHE_MODES = ("naive", *POLICIES)


def min_call_bytes(store: ExpertStore) -> int:
    """Bytes one decoding step of the largest MoE layer needs at once: its k largest experts."""
    best = 0
    for lay in store.layers:
        sizes = sorted((f.nbytes for f in lay.experts), reverse=True)
        best = max(best, sum(sizes[: max(lay.k, 1)]))
    return best


class ExpertRuntime:
    """What a model's ``OffloadedExperts`` share: the cache, the prefetcher and the telemetry."""

    def __init__(self, cache: ExpertCache, telemetry: Telemetry, quantized: bool) -> None:
        self.cache, self.telemetry, self.quantized = cache, telemetry, quantized
        self.prefetcher: Prefetcher | None = None

    def run_call(self, layer: int, experts: tuple[int, ...], x: Tensor, compute: Callable[[int, Any], None]) -> None:
        """One MoE layer call: fetch ``experts`` chunk by chunk, start the next layer's prefetch once the
        first chunk is resident, and ``compute(e, weights)`` each expert."""
        self.telemetry.record_call(layer, experts)
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, experts)
        chunks = self.cache.begin_call(layer, [(layer, e) for e in experts])
        for i, chunk in enumerate(chunks):
            self.cache.acquire(chunk)
            try:
                if i == 0 and self.prefetcher is not None:
                    self.prefetcher.prefetch(layer, x, limit=len(experts))
                for key in chunk:
                    compute(key[1], self.cache.get(key))
            finally:
                self.cache.release(chunk)


def build_skeleton(store: ExpertStore) -> nn.Module:
    """The stored model without weights (on the meta device), from the manifest's description."""
    desc = store.model_description
    if desc.get("type") != "moekit.MoETransformerLM":
        raise ValueError(
            f"the store holds a {desc.get('type')!r}; pass model= (the model built on the meta device, "
            "with its MoE layers in place) to EdgeModel"
        )
    from moekit.models import LMConfig, MoETransformerLM

    with torch.device("meta"):
        return MoETransformerLM(LMConfig.from_dict(desc["config"]))


def attach(model: nn.Module, store: ExpertStore, runtime: ExpertRuntime) -> nn.Module:
    """Put ``OffloadedExperts`` in every ``MoELayer`` of ``model`` and load the resident weights."""
    layers = moe_layers_of(model)
    names = [name for name, _ in layers]
    stored = [lay.module for lay in store.layers]
    if names != stored:
        raise StoreError(f"the model's MoE layers {names} differ from the store's {stored}")
    for info, (name, layer) in zip(store.layers, layers, strict=True):
        if layer.num_experts != info.num_experts or layer.d_model != info.d_model:
            raise StoreError(
                f"{name}: the model has {layer.num_experts} experts of width {layer.d_model}, the store "
                f"{info.num_experts} of width {info.d_model}"
            )
        layer.experts = OffloadedExperts(info.index, info, runtime)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        _check_meta_buffers(model)
        model.to_empty(device="cpu")
        for _, layer in layers:  # non-persistent, so not in the state dict
            layer.load_since_step = torch.zeros(layer.num_experts, dtype=torch.long)
    result = model.load_state_dict(store.load_resident(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise StoreError(
            f"resident weights do not match the model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise StoreError("some non-expert tensors are still unset after loading the resident weights")
    return model.eval()


def _check_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (not in any state dict) of a meta skeleton cannot be restored, except the MoE
    layers' load counters, which start at zero."""
    lost = []
    for mod_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None and buf.is_meta and name != "load_since_step":
                lost.append(f"{mod_name}.{name}" if mod_name else name)
    if lost:
        raise StoreError(
            f"the meta-device model has non-persistent buffers {lost} that no checkpoint restores; build the "
            "skeleton on the CPU instead (its experts are freed when they are swapped out)"
        )


@dataclass
class EdgeSettings:
    """How an ``EdgeModel`` was set up (kept in its summary)."""

    cache: str
    prefetch: bool
    budget_bytes: int
    budget_share: float
    storage_mbps: float | None
    quantization: str | None
    pinned: int = 0
    committee_share: float | None = None
    startup_bytes: int = 0
    page_cache_dropped: int = 0


class EdgeModel:
    """A model served from an ``ExpertStore`` under a memory budget.

    Args:
        store: an ``ExpertStore`` or its directory.
        memory_budget: bytes, ``"64MB"`` or a share of all expert bytes (``"25%"``).
        cache: ``"naive"`` (load every expert on use, keep nothing) or a policy in ``POLICIES``.
        prefetch: predict and load the next layer's experts on a background thread.
        storage_mbps: throttle reads to emulate a slower device (MB/s); None reads at disk speed.
        model: the model skeleton (meta device is fine) for stores of non-moekit models.
        trace: the recorded trace the ``belady`` policy replays.
        pinned: the committee for ``committee`` (default: from the store's calibration usage).
        calibration_trace: a trace on calibration data to choose the committee's share of the budget.
        checksums: passed to ``ExpertStore`` when ``store`` is a path.
        drop_page_cache: drop the page cache of the store's files before starting (honest cold reads).
        prefetch_min_precision: prefetch a layer only while its recent prediction precision reaches this.
    """

    def __init__(
        self,
        store: ExpertStore | str,
        *,
        memory_budget: str | int | float = "25%",
        cache: str = "lru",
        prefetch: bool = False,
        storage_mbps: float | None = None,
        model: nn.Module | None = None,
        trace: Sequence[TraceCall] | None = None,
        pinned: Sequence[Key] | None = None,
        calibration_trace: Sequence[TraceCall] | None = None,
        checksums: str = "first",
        drop_page_cache: bool = True,
        prefetch_min_precision: float = 0.5,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache == "naive" and prefetch:
            raise ValueError("naive on-demand loading keeps nothing, so it cannot prefetch")
        self.store = store if isinstance(store, ExpertStore) else ExpertStore(store, checksums=checksums)
        self.store.set_storage_mbps(storage_mbps)
        self.store.reset_stats()
        total = self.store.expert_bytes
        budget = parse_budget(memory_budget, total)
        min_bytes = min_call_bytes(self.store)
        policy, committee_share = self._policy(cache, budget, min_bytes, trace, pinned, calibration_trace)
        self.cache = ExpertCache(
            budget,
            self.store.nbytes,
            policy,
            loader=self.store.load_expert,
            keep=cache != "naive",
            min_call_bytes=min_bytes,
            total_bytes=total,
        )
        self.telemetry = Telemetry()
        self.runtime = ExpertRuntime(self.cache, self.telemetry, quantized=self.store.quantization is not None)
        self.model = attach(model if model is not None else build_skeleton(self.store), self.store, self.runtime)
        self.model.register_forward_pre_hook(lambda *_: self.telemetry.next_step())
        if prefetch:
            routers = []
            for _, layer in moe_layers_of(self.model):
                routers.append(None if layer.router.needs_token_ids else layer.router)
            self.runtime.prefetcher = Prefetcher(
                routers,
                self.cache,
                self.store.load_expert,
                self.telemetry,
                min_precision=prefetch_min_precision,
            )
        dropped = self.store.drop_page_cache() if drop_page_cache else 0
        start_bytes = self.cache.preload()
        self.settings = EdgeSettings(
            cache=cache,
            prefetch=prefetch,
            budget_bytes=budget,
            budget_share=budget / total,
            storage_mbps=storage_mbps,
            quantization=self.store.quantization,
            pinned=len(policy.pinned),
            committee_share=committee_share,
            startup_bytes=start_bytes,
            page_cache_dropped=dropped,
        )
        self.store.reset_stats()  # a preload (committee, Belady) is startup, not part of the run

    def _policy(
        self,
        cache: str,
        budget: int,
        min_bytes: int,
        trace: Sequence[TraceCall] | None,
        pinned: Sequence[Key] | None,
        calibration_trace: Sequence[TraceCall] | None,
    ) -> tuple[CachePolicy, float | None]:
        if cache == "naive":
            return make_policy("lru"), None
        if cache != "committee":
            return make_policy(cache, trace=trace), None
        if pinned is not None:
            return make_policy("committee", pinned=pinned), None
        usage = self.store.usage
        if usage is None:
            raise ValueError(
                "the committee policy needs calibration usage: build the store with usage=... (see "
                "record_routing), call store.write_usage(...), or pass pinned="
            )
        chosen, share = choose_committee(usage, self.store.nbytes, budget, min_bytes, calibration_trace)
        return make_policy("committee", pinned=chosen), share

    # ---------------------------------------------------------------- running
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, idx: Tensor, max_new_tokens: int, **kwargs: Any) -> Tensor:
        """Generate with the offloaded model (``moekit.models.generate`` for a ``MoETransformerLM``, else the
        model's own ``generate(idx, max_new_tokens=..., **kwargs)``); timed into the telemetry."""
        from moekit.models import MoETransformerLM
        from moekit.models.generate import generate

        start = time.perf_counter()
        if isinstance(self.model, MoETransformerLM):
            out = generate(self.model, idx, max_new_tokens, **kwargs)
        else:
            with torch.no_grad():
                out = self.model.generate(idx, max_new_tokens=max_new_tokens, **kwargs)
        self.telemetry.add_tokens(max_new_tokens, time.perf_counter() - start)
        return out

    def reset_stats(self) -> None:
        """Start counting afresh (cache contents and the peak resident bytes are kept)."""
        peak = self.cache.stats.peak_bytes
        self.cache.stats = CacheStats(peak_bytes=peak)
        self.store.reset_stats()
        self.telemetry = self.runtime.telemetry = Telemetry(step=self.telemetry.step)
        if self.runtime.prefetcher is not None:
            self.runtime.prefetcher.telemetry = self.telemetry

    def summary(self) -> dict[str, Any]:
        """Settings, cache counts, bytes read, prefetch accuracy and throughput of the run so far."""
        extra = dict(vars(self.settings))
        extra["expert_bytes"] = self.store.expert_bytes
        return summarize(
            self.telemetry,
            self.cache.stats,
            bytes_read=self.store.bytes_read,
            read_seconds=self.store.read_seconds,
            extra=extra,
        )

    def close(self) -> None:
        """Finish in-flight loads and stop the prefetch thread."""
        if self.runtime.prefetcher is not None:
            self.runtime.prefetcher.close()
        self.cache.drain()

    def __enter__(self) -> EdgeModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class StreamResult:
    """Logits of a token-by-token pass: ``logits`` (N - P + 1, V) for positions P-1 .. N-1."""

    logits: Tensor
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@torch.no_grad()
def decode_stream(
    model: nn.Module, ids: Tensor, prompt_len: int, after_prefill: Callable[[], None] | None = None
) -> StreamResult:
    """Run ids (1, N) as decoding does: the first ``prompt_len`` tokens in one pass (filling the KV cache),
    then one token per step, each step fed the next token of ``ids`` (teacher forcing).

    ``after_prefill()`` runs between the prompt pass and the first step (e.g. to reset counters); its time
    is not counted.
    """
    if ids.dim() != 2 or ids.shape[0] != 1 or not 1 <= prompt_len <= ids.shape[1]:
        raise ValueError(f"ids must be (1, N) with 1 <= prompt_len <= N, got {tuple(ids.shape)}, {prompt_len}")
    was_training = model.training
    model.eval()
    try:
        N = ids.shape[1]
        cache = model.init_kv_cache(batch_size=1, max_len=N)
        start = time.perf_counter()
        logits = [model(ids[:, :prompt_len], kv_cache=cache, start_pos=0).logits[0, -1]]  # (V,)
        mid = time.perf_counter()
        if after_prefill is not None:
            after_prefill()
            mid = time.perf_counter()
        for pos in range(prompt_len, N):
            logits.append(model(ids[:, pos : pos + 1], kv_cache=cache, start_pos=pos).logits[0, -1])
        end = time.perf_counter()
    finally:
        model.train(was_training)
    return StreamResult(torch.stack(logits), mid - start, end - mid, N - prompt_len)


@dataclass
class RoutingRecord:
    """What ``record_routing`` saw: the trace (layer, experts computed) of every MoE layer call in order, the
    model forward (step, from 1) of each call, and ``usage[l][e]`` = token-expert pairs computed."""

    trace: list[TraceCall]
    call_steps: list[int]
    usage: list[list[int]]


def record_routing(model: nn.Module, run: Callable[[], Any]) -> RoutingRecord:
    """Call ``run()`` and record the MoE routing of ``model`` (resident or offloaded) meanwhile."""
    layers = moe_layers_of(model)
    record = RoutingRecord([], [], [[0] * layer.num_experts for _, layer in layers])
    step = [0]

    def count_step(*_: Any) -> None:
        step[0] += 1

    def hook(index: int) -> Callable:
        def fn(module: nn.Module, args: Any, out: Any) -> None:
            stats = out.stats
            counts = (stats["tokens_per_expert"] - stats["dropped_per_expert"]).tolist()
            experts = tuple(e for e, c in enumerate(counts) if c)
            if experts:
                record.trace.append((index, experts))
                record.call_steps.append(step[0])
            for e, c in enumerate(counts):
                record.usage[index][e] += int(c)

        return fn

    handles = [model.register_forward_pre_hook(count_step)]
    handles += [layer.register_forward_hook(hook(i)) for i, (_, layer) in enumerate(layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return record


def ensure_store(
    store_dir: str | Path,
    load_model: Callable[[], nn.Module],
    *,
    calibration_ids: Tensor | None = None,
    prompt_len: int = 16,
    quantization: str | None = None,
) -> ExpertStore:
    """The store in ``store_dir``, first built from ``load_model()`` when the directory has no manifest.

    With ``calibration_ids`` (1, N) the committee's usage counts are recorded meanwhile: the resident model
    decodes them token by token (a ``MoETransformerLM``) or runs one forward pass on them (other models).
    A store that exists but is damaged raises ``StoreError``; it is never rebuilt silently.
    """
    root = Path(store_dir)
    if (root / MANIFEST).exists():
        return ExpertStore(root)
    from moekit.models import MoETransformerLM

    model = load_model().eval()
    usage = None
    if calibration_ids is not None:
        if isinstance(model, MoETransformerLM):
            n = min(prompt_len, calibration_ids.shape[1])
            usage = record_routing(model, lambda: decode_stream(model, calibration_ids, n)).usage
        else:
            with torch.no_grad():
                usage = record_routing(model, lambda: model(calibration_ids)).usage
    return build_expert_store(model, root, quantization=quantization, usage=usage)
