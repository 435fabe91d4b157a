"""The expert cache: which experts stay resident under a byte budget, and the eviction policies.

``ExpertCache`` holds loaded experts keyed by ``(layer, expert)``. One MoE layer call is
``chunks = cache.begin_call(layer, keys)``, then per chunk ``acquire`` (count hits and misses, load the
misses, lock the chunk), ``get`` each expert, ``release``. The bytes of resident (and in-flight) experts never
exceed the capacity: room is made *before* a load starts, by evicting unlocked, unpinned experts that the
policy picks.

Policies (``make_policy``):

- ``lru``: evict the least recently used expert.
- ``lfu``: evict the least frequently used one (counts over the whole run; ties by recency).
- ``committee``: a pinned "parameter committee" of the most-used experts on calibration data stays
  resident; the rest of the budget is an LRU cache.
- ``least_stale``: our reading of SpecMD's Least-Stale (Hoang et al., 2026). Decoding sweeps the layers in a
  fixed cycle, so an expert already used in the current pass (token) is not needed again before the next
  pass, while experts last used in an earlier pass may be needed later in this one. Evict first the expert of
  the current pass used most recently (its next use is furthest away in the cycle), else the stalest one.
- ``belady``: Belady's optimal replacement (evict the expert whose next use is furthest in the future),
  replayed on a recorded trace, starting from the experts used first (a free preload, as the committee
  gets): the upper bound of any policy at that capacity.

The same code replays a recorded trace without loading anything (``simulate``), so hit rates of every policy
and budget come cheaply, and equal the runtime's own counts for the same trace.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from moekit.inference.budget import BudgetError, format_bytes

Key = tuple[int, int]  # (MoE layer index, expert index)
TraceCall = tuple[int, tuple[int, ...]]  # (layer, experts used by that layer call), in call order

POLICIES = ("lru", "lfu", "committee", "least_stale", "belady")


# ------------------------------------------------------------------------------------------------ policies


class CachePolicy:
    """Base policy: sees every call start, access, insert and eviction; picks victims."""

    name = "base"

    def __init__(self) -> None:
        self.pinned: frozenset[Key] = frozenset()
        self.clock = 0
        self.last: dict[Key, int] = {}

    def on_call(self, layer: int, keys: Sequence[Key]) -> None:
        """A layer call that will access ``keys`` starts."""

    def on_insert(self, key: Key) -> None:
        """``key`` was inserted (a demand miss or a prefetch)."""
        self.clock += 1
        self.last[key] = self.clock

    def on_access(self, key: Key, hit: bool) -> None:
        """``key`` is used by the current layer call (after ``on_insert`` on a miss)."""
        self.clock += 1
        self.last[key] = self.clock

    def on_evict(self, key: Key) -> None:
        """``key`` left the cache."""

    def victim(self, candidates: list[Key]) -> Key:
        """The expert to evict among ``candidates`` (resident, unlocked, unpinned)."""
        return min(candidates, key=lambda k: self.last.get(k, 0))

    def preload(self, capacity: int, sizes: Callable[[Key], int]) -> list[Key]:
        """Experts to load before the run (not counted as accesses): the pinned ones."""
        return sorted(self.pinned)


class LRUPolicy(CachePolicy):
    """Least recently used."""

    name = "lru"


class LFUPolicy(CachePolicy):
    """Least frequently used over the whole run (counts survive eviction); ties go to the least recent."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.freq: dict[Key, int] = {}

    def on_access(self, key: Key, hit: bool) -> None:
        super().on_access(key, hit)
        self.freq[key] = self.freq.get(key, 0) + 1

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.freq.get(k, 0), self.last.get(k, 0)))


class CommitteePolicy(CachePolicy):
    """A pinned committee of experts (never evicted) plus LRU for the rest of the budget."""

    name = "committee"

    def __init__(self, pinned: Iterable[Key]) -> None:
        super().__init__()
        self.pinned = frozenset(pinned)


class LeastStalePolicy(CachePolicy):
    """Evict the most recently used expert of the current pass first, else the least recently used one."""

    name = "least_stale"

    def __init__(self) -> None:
        super().__init__()
        self.pass_id = 0
        self._prev_layer: int | None = None
        self.used_in_pass: dict[Key, int] = {}

    def on_call(self, layer: int, keys: Sequence[Key]) -> None:
        if self._prev_layer is not None and layer <= self._prev_layer:
            self.pass_id += 1  # the layer cycle wrapped around: a new token (or a new forward)
        self._prev_layer = layer

    def on_access(self, key: Key, hit: bool) -> None:
        super().on_access(key, hit)
        self.used_in_pass[key] = self.pass_id

    def victim(self, candidates: list[Key]) -> Key:
        fresh = [k for k in candidates if self.used_in_pass.get(k, -1) == self.pass_id]
        if fresh:
            return max(fresh, key=lambda k: self.last.get(k, 0))
        return min(candidates, key=lambda k: self.last.get(k, 0))


class BeladyPolicy(CachePolicy):
    """Belady's MIN on a recorded trace: evict the expert whose next use is furthest away (or never).

    The run must make the same layer calls, in the same order, as the trace (raises ``RuntimeError`` if not).
    Positions are layer calls, so the order of experts inside one call does not matter.
    """

    name = "belady"

    def __init__(self, trace: Sequence[TraceCall]) -> None:
        super().__init__()
        self.trace = [(layer, frozenset(experts)) for layer, experts in trace]
        self.uses: dict[Key, list[int]] = {}
        for pos, (layer, experts) in enumerate(self.trace):
            for e in sorted(experts):
                self.uses.setdefault((layer, e), []).append(pos)
        self.pos = -1

    def on_call(self, layer: int, keys: Sequence[Key]) -> None:
        self.pos += 1
        if self.pos >= len(self.trace):
            raise RuntimeError(f"Belady: the run makes more layer calls than the trace's {len(self.trace)}")
        t_layer, t_experts = self.trace[self.pos]
        if layer != t_layer or {e for _, e in keys} != t_experts:
            raise RuntimeError(
                f"Belady: layer call {self.pos} uses layer {layer} experts {sorted(e for _, e in keys)}, the "
                f"trace says layer {t_layer} experts {sorted(t_experts)}: record the trace on the same inputs"
            )

    def next_use(self, key: Key) -> float:
        uses = self.uses.get(key, [])
        i = bisect.bisect_right(uses, self.pos)
        return uses[i] if i < len(uses) else math.inf

    def victim(self, candidates: list[Key]) -> Key:
        return max(candidates, key=lambda k: (self.next_use(k), k))

    def preload(self, capacity: int, sizes: Callable[[Key], int]) -> list[Key]:
        """The experts used first, filling the whole capacity: the best start any preload can give, so that
        Belady stays an upper bound for policies that preload (the committee)."""
        first = sorted((uses[0], key) for key, uses in self.uses.items())
        out, used = [], 0
        for _, key in first:
            if used + sizes(key) > capacity:
                break
            out.append(key)
            used += sizes(key)
        return out


def make_policy(name: str, *, pinned: Iterable[Key] = (), trace: Sequence[TraceCall] | None = None) -> CachePolicy:
    """A fresh policy by name (``POLICIES``); ``committee`` needs ``pinned``, ``belady`` needs ``trace``."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "least_stale":
        return LeastStalePolicy()
    if name == "committee":
        return CommitteePolicy(pinned)
    if name == "belady":
        if trace is None:
            raise ValueError("the belady policy needs a recorded trace (trace=...)")
        return BeladyPolicy(trace)
    raise ValueError(f"cache policy must be one of {POLICIES}, got {name!r}")


# ------------------------------------------------------------------------------------------------ statistics


@dataclass
class CacheStats:
    """Counts of one run. Hit: the expert was resident (or being prefetched) when a call needed it."""

    accesses: int = 0
    hits: int = 0
    inflight_hits: int = 0  # hits on a prefetch still loading (the call waited for the rest)
    loads: int = 0  # demand loads (misses)
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # evicted or cancelled before any use
    peak_bytes: int = 0
    stall_seconds: float = 0.0  # waiting for in-flight prefetches
    load_seconds: float = 0.0  # demand loads
    per_layer: dict[int, list[int]] = field(default_factory=dict)  # layer -> [hits, accesses]

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else math.nan

    def layer_hit_rates(self) -> dict[int, float]:
        return {layer: h / a if a else math.nan for layer, (h, a) in sorted(self.per_layer.items())}


@dataclass
class _Entry:
    nbytes: int
    value: Any = None
    future: Future | None = None
    prefetched: bool = False  # inserted by a prefetch and not used yet
    locks: int = 0

    @property
    def ready(self) -> bool:
        return self.future is None or self.future.done()


# ------------------------------------------------------------------------------------------------ the cache


class ExpertCache:
    """Resident experts under a byte budget.

    Args:
        capacity: bytes of expert weights that may be resident (loaded or loading) at once.
        sizes: bytes of each expert.
        policy: the eviction policy (its ``pinned`` experts are never evicted).
        loader: ``loader(key)`` reads an expert (None: simulate, nothing is loaded).
        keep: False drops every expert right after its call (naive on-demand loading, no caching).
        min_call_bytes: bytes one layer call must be able to hold (k experts); checked against the budget.
    """

    def __init__(
        self,
        capacity: int,
        sizes: Callable[[Key], int],
        policy: CachePolicy,
        loader: Callable[[Key], Any] | None = None,
        keep: bool = True,
        min_call_bytes: int = 0,
        total_bytes: int = 0,
    ) -> None:
        self.capacity = int(capacity)
        self.sizes, self.policy, self.loader, self.keep = sizes, policy, loader, keep
        self.entries: dict[Key, _Entry] = {}
        self.resident_bytes = 0
        self.stats = CacheStats()
        self.pinned_bytes = sum(sizes(k) for k in policy.pinned)
        check = min_call_bytes + self.pinned_bytes
        if self.capacity < check:
            why = (
                "one layer's active experts must fit next to the pinned committee"
                if self.pinned_bytes
                else ("one MoE layer's active experts (k per token) must fit at once")
            )
            from moekit.inference.budget import check_budget

            check_budget(self.capacity, check, total_bytes, why)

    # ---------------------------------------------------------------- bookkeeping
    def _add(self, key: Key, entry: _Entry) -> None:
        self.entries[key] = entry
        self.resident_bytes += entry.nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.resident_bytes)
        assert self.resident_bytes <= self.capacity, "expert cache exceeded its byte budget"

    def _remove(self, key: Key) -> None:
        entry = self.entries.pop(key)
        self.resident_bytes -= entry.nbytes
        if entry.prefetched:
            self.stats.prefetch_wasted += 1
        self.policy.on_evict(key)

    def _make_room(self, nbytes: int, may_wait: bool) -> bool:
        """Evict until ``nbytes`` more fit; False if that needs locked/pinned experts (or waiting, when not
        ``may_wait``)."""
        pinned = self.policy.pinned
        if not may_wait:  # do not evict anything unless the whole room can be made
            free_bytes = sum(e.nbytes for k, e in self.entries.items() if e.locks == 0 and k not in pinned and e.ready)
            if self.resident_bytes - free_bytes + nbytes > self.capacity:
                return False
        while self.resident_bytes + nbytes > self.capacity:
            free = [k for k, e in self.entries.items() if e.locks == 0 and k not in pinned and e.ready]
            if free:
                self._remove(self.policy.victim(free))
                self.stats.evictions += 1
                continue
            loading = [k for k, e in self.entries.items() if e.locks == 0 and k not in pinned]
            if not loading or not may_wait:
                return False
            key = loading[0]
            future = self.entries[key].future
            if future is not None and not future.cancel():
                self._wait(key)  # it is being read: let it finish, then it can be evicted
            else:
                self._remove(key)
        return True

    def _wait(self, key: Key) -> Any:
        entry = self.entries[key]
        if entry.future is not None:
            start = time.perf_counter()
            entry.value = entry.future.result()
            self.stats.stall_seconds += time.perf_counter() - start
            entry.future = None
        return entry.value

    # ---------------------------------------------------------------- one layer call
    def begin_call(self, layer: int, keys: Sequence[Key]) -> list[list[Key]]:
        """Start a layer call needing ``keys``; returns them split into chunks that fit the budget together
        (resident experts first). Prefetches of this layer that the call does not need are cancelled."""
        self.policy.on_call(layer, keys)
        wanted = set(keys)
        for key in [k for k, e in self.entries.items() if k[0] == layer and e.prefetched and k not in wanted]:
            entry = self.entries[key]
            if entry.future is not None and entry.future.cancel():
                self._remove(key)
        room = self.capacity - self.pinned_bytes
        present = [k for k in keys if k in self.entries]
        missing = [k for k in keys if k not in self.entries]
        chunks: list[list[Key]] = []
        chunk: list[Key] = []
        used = 0
        for key in present + missing:
            nbytes = 0 if key in self.policy.pinned else self.sizes(key)
            if chunk and used + nbytes > room:
                chunks.append(chunk)
                chunk, used = [], 0
            if nbytes > room:
                raise BudgetError(
                    f"expert {key} ({format_bytes(nbytes)}) does not fit the unpinned budget {format_bytes(room)}"
                )
            chunk.append(key)
            used += nbytes
        if chunk:
            chunks.append(chunk)
        return chunks

    def acquire(self, chunk: Sequence[Key]) -> None:
        """Count hits and misses of ``chunk``, lock it, and load its misses (synchronously)."""
        for key in chunk:  # lock the resident ones first, so loading the misses cannot evict them
            if key in self.entries:
                self.entries[key].locks += 1
        for key in chunk:
            self.stats.accesses += 1
            per_layer = self.stats.per_layer.setdefault(key[0], [0, 0])
            per_layer[1] += 1
            entry = self.entries.get(key)
            if entry is not None:
                self.stats.hits += 1
                per_layer[0] += 1
                if entry.prefetched:
                    self.stats.prefetch_used += 1
                    entry.prefetched = False
                if not entry.ready:
                    self.stats.inflight_hits += 1
                self.policy.on_access(key, hit=True)
                continue
            nbytes = self.sizes(key)
            if not self._make_room(nbytes, may_wait=True):
                raise RuntimeError(f"expert cache: no room for {key} although the budget was checked")
            start = time.perf_counter()
            value = self.loader(key) if self.loader is not None else None
            self.stats.load_seconds += time.perf_counter() - start
            self.stats.loads += 1
            self._add(key, _Entry(nbytes, value=value, locks=1))
            self.policy.on_insert(key)
            self.policy.on_access(key, hit=False)

    def get(self, key: Key) -> Any:
        """The loaded expert (waits for an in-flight prefetch)."""
        return self._wait(key)

    def release(self, chunk: Sequence[Key]) -> None:
        """Unlock ``chunk``; without ``keep``, drop its experts at once."""
        for key in chunk:
            entry = self.entries.get(key)
            if entry is None:
                continue
            entry.locks -= 1
            if not self.keep and entry.locks == 0 and key not in self.policy.pinned:
                self._remove(key)

    # ---------------------------------------------------------------- prefetch and preload
    def prefetch(self, keys: Sequence[Key], submit: Callable[[Key], Future]) -> list[Key]:
        """Start loading ``keys`` in the background where room can be made without touching locked, pinned or
        loading experts; returns the keys whose load was started."""
        started = []
        for key in keys:
            if key in self.entries:
                continue
            nbytes = self.sizes(key)
            if not self._make_room(nbytes, may_wait=False):
                break
            # locked until the loop ends, so that one prefetch never evicts another of the same batch
            self._add(key, _Entry(nbytes, future=submit(key), prefetched=True, locks=1))
            self.policy.on_insert(key)
            self.stats.prefetch_issued += 1
            started.append(key)
        for key in started:
            self.entries[key].locks -= 1
        return started

    def preload(self) -> int:
        """Load what the policy preloads (the pinned committee; Belady's first-used experts), not counted as
        accesses; returns the bytes loaded."""
        loaded = 0
        for key in self.policy.preload(self.capacity, self.sizes):
            if key in self.entries:
                continue
            nbytes = self.sizes(key)
            if not self._make_room(nbytes, may_wait=True):
                raise BudgetError(f"the preloaded experts do not fit the budget {format_bytes(self.capacity)}")
            value = self.loader(key) if self.loader is not None else None
            self._add(key, _Entry(nbytes, value=value))
            self.policy.on_insert(key)
            loaded += nbytes
        return loaded

    def drain(self) -> None:
        """Wait for (or cancel) every in-flight prefetch."""
        for key in list(self.entries):
            entry = self.entries.get(key)
            if entry is not None and entry.future is not None:
                if entry.future.cancel():
                    self._remove(key)
                else:
                    self._wait(key)


# ------------------------------------------------------------------------------------------------ replay


def simulate(
    trace: Sequence[TraceCall],
    policy: CachePolicy,
    capacity: int,
    sizes: Callable[[Key], int],
    min_call_bytes: int = 0,
    count_from: int = 0,
) -> CacheStats:
    """Replay a trace through an ``ExpertCache`` that loads nothing (no prefetch); returns its stats, counted
    from layer call ``count_from`` on (earlier calls only warm the cache)."""
    cache = ExpertCache(capacity, sizes, policy, loader=None, min_call_bytes=min_call_bytes)
    cache.preload()
    for i, (layer, experts) in enumerate(trace):
        if i == count_from and i:
            cache.stats = CacheStats(peak_bytes=cache.stats.peak_bytes)
        for chunk in cache.begin_call(layer, [(layer, e) for e in experts]):
            cache.acquire(chunk)
            cache.release(chunk)
    return cache.stats


def committee_from_usage(usage: Sequence[Sequence[int]], sizes: Callable[[Key], int], pin_bytes: int) -> list[Key]:
    """The most-used experts (over all layers, by calibration count) whose bytes fit ``pin_bytes``."""
    ranked = sorted(
        ((int(c), layer, e) for layer, counts in enumerate(usage) for e, c in enumerate(counts)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    pinned, used = [], 0
    for count, layer, e in ranked:
        if count <= 0:
            break
        nbytes = sizes((layer, e))
        if used + nbytes <= pin_bytes:
            pinned.append((layer, e))
            used += nbytes
    return pinned


def choose_committee(
    usage: Sequence[Sequence[int]],
    sizes: Callable[[Key], int],
    capacity: int,
    min_call_bytes: int,
    calibration_trace: Sequence[TraceCall] | None = None,
    shares: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> tuple[list[Key], float]:
    """Pick the committee: the share of the spare budget (``capacity - min_call_bytes``) given to pinned
    experts is the one with the best hit rate on ``calibration_trace`` (else 0.75). Share 0 (plain LRU) is a
    candidate, so the committee never does worse than LRU on the calibration data.

    Returns (pinned keys, share).
    """
    spare = max(capacity - min_call_bytes, 0)
    if not calibration_trace:
        share = 0.75
        return committee_from_usage(usage, sizes, int(share * spare)), share
    best: tuple[float, float, list[Key]] | None = None
    for share in shares:
        pinned = committee_from_usage(usage, sizes, int(share * spare))
        stats = simulate(calibration_trace, CommitteePolicy(pinned), capacity, sizes, min_call_bytes)
        if best is None or stats.hit_rate > best[0]:
            best = (stats.hit_rate, share, pinned)
    assert best is not None
    return best[2], best[1]
