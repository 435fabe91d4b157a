"""Cache policies on hand-made and random traces: budgets never exceeded, textbook behaviour, Belady best."""

from __future__ import annotations

import random
from concurrent.futures import Future

import pytest

from moekit.inference import (
    BudgetError,
    ExpertCache,
    choose_committee,
    committee_from_usage,
    make_policy,
    simulate,
)
from moekit.inference.cache import POLICIES, BeladyPolicy

SIZE = 10


def size(_key) -> int:
    return SIZE


def random_trace(seed: int, steps: int = 60, layers: int = 3, experts: int = 8, k: int = 2, skew: float = 1.2):
    rng = random.Random(seed)
    weights = [1.0 / (e + 1) ** skew for e in range(experts)]  # Zipf-like popularity
    trace = []
    for _ in range(steps):
        for layer in range(layers):
            chosen = set()
            while len(chosen) < k:
                chosen.add(rng.choices(range(experts), weights)[0])
            trace.append((layer, tuple(sorted(chosen))))
    return trace


def policy_for(name, trace, capacity):
    pinned = []
    if name == "committee":
        usage = [[0] * 8 for _ in range(3)]
        for layer, experts in trace:
            for e in experts:
                usage[layer][e] += 1
        pinned, _ = choose_committee(usage, size, capacity, 2 * SIZE, trace)
    return make_policy(name, pinned=pinned, trace=trace)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_never_exceeded_and_belady_is_best(seed):
    trace = random_trace(seed)
    for slots in (2, 3, 5, 8, 12, 24):
        capacity = slots * SIZE
        rates = {}
        for name in POLICIES:
            stats = simulate(trace, policy_for(name, trace, capacity), capacity, size, min_call_bytes=2 * SIZE)
            assert stats.peak_bytes <= capacity
            assert stats.accesses == 2 * len(trace)
            rates[name] = stats.hit_rate
        assert all(rates["belady"] >= r - 1e-12 for r in rates.values()), rates
    full = simulate(trace, make_policy("lru"), 24 * SIZE, size)
    assert full.loads == 24  # everything fits: only cold misses


def test_lru_and_lfu_textbook():
    # one layer, k = 1 per call, room for 2 experts
    trace = [(0, (e,)) for e in (1, 2, 1, 3, 2, 1)]
    lru = simulate(trace, make_policy("lru"), 2 * SIZE, size)
    # 1m 2m 1h 3m(evict 2) 2m(evict 1) 1m(evict 3)
    assert (lru.hits, lru.loads) == (1, 5)
    lfu = simulate(trace, make_policy("lfu"), 2 * SIZE, size)
    # 1m 2m 1h 3m(evict 2: freq 1 < 2) 2m(evict 3) 1h
    assert (lfu.hits, lfu.loads) == (2, 4)


def test_least_stale_beats_lru_on_the_layer_cycle():
    # three layers use the same expert every token, room for two: LRU thrashes on the cycle
    trace = [(layer, (0,)) for _ in range(3) for layer in range(3)]
    lru = simulate(trace, make_policy("lru"), 2 * SIZE, size)
    ls = simulate(trace, make_policy("least_stale"), 2 * SIZE, size)
    belady = simulate(trace, make_policy("belady", trace=trace), 2 * SIZE, size)
    assert (lru.hits, ls.hits) == (0, 3)
    assert belady.hits >= ls.hits


def test_least_stale_victims():
    policy = make_policy("least_stale")
    policy.on_call(0, [(0, 1)])
    for key in [(0, 1), (0, 2), (0, 3)]:
        policy.on_insert(key)  # inserted (e.g. prefetched), not used: not fresh
    policy.on_access((0, 2), hit=False)  # used in this pass
    policy.on_access((0, 3), hit=False)  # used in this pass, later
    assert policy.victim([(0, 1), (0, 2), (0, 3)]) == (0, 3)  # the most recent of the current pass
    policy.on_call(0, [(0, 1)])  # the layer cycle wraps: a new pass
    assert policy.victim([(0, 1), (0, 2), (0, 3)]) == (0, 1)  # nothing fresh: the least recently used


def test_belady_needs_the_same_calls():
    trace = [(0, (1, 2)), (1, (3, 4))]
    policy = BeladyPolicy(trace)
    policy.on_call(0, [(0, 1), (0, 2)])
    with pytest.raises(RuntimeError, match="trace"):
        policy.on_call(1, [(1, 3), (1, 5)])
    with pytest.raises(ValueError, match="trace"):
        make_policy("belady")
    with pytest.raises(ValueError, match="policy"):
        make_policy("fifo")


def test_committee_is_never_evicted():
    trace = random_trace(3)
    usage = [[10, 8, 1, 0, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0, 0, 0], [0] * 8]
    pinned = committee_from_usage(usage, size, 3 * SIZE)
    assert pinned == [(0, 0), (1, 0), (0, 1)]
    cache = ExpertCache(6 * SIZE, size, make_policy("committee", pinned=pinned), min_call_bytes=2 * SIZE)
    cache.preload()
    for layer, experts in trace:
        for chunk in cache.begin_call(layer, [(layer, e) for e in experts]):
            cache.acquire(chunk)
            cache.release(chunk)
            assert all(k in cache.entries for k in pinned)
    with pytest.raises(BudgetError, match="next to the pinned committee, so the minimum is 50 B"):
        ExpertCache(4 * SIZE, size, make_policy("committee", pinned=pinned), min_call_bytes=2 * SIZE)


def test_naive_keeps_nothing_and_large_calls_are_chunked():
    cache = ExpertCache(2 * SIZE, size, make_policy("lru"), keep=False, min_call_bytes=2 * SIZE)
    for _ in range(3):
        chunks = cache.begin_call(0, [(0, e) for e in range(5)])
        assert [len(c) for c in chunks] == [2, 2, 1]  # five experts through room for two
        for chunk in chunks:
            cache.acquire(chunk)
            assert cache.resident_bytes <= 2 * SIZE
            cache.release(chunk)
        assert not cache.entries
    assert cache.stats.hits == 0 and cache.stats.loads == 15


def test_prefetch_respects_locks_and_budget():
    loaded = []

    def submit(key):
        loaded.append(key)
        fut: Future = Future()
        fut.set_result(f"w{key}")
        return fut

    cache = ExpertCache(3 * SIZE, size, make_policy("lru"), loader=lambda k: f"w{k}", min_call_bytes=2 * SIZE)
    (chunk,) = cache.begin_call(0, [(0, 0), (0, 1)])
    cache.acquire(chunk)
    started = cache.prefetch([(1, 5), (1, 6)], submit)  # room for one more; the locked pair stays
    assert started == [(1, 5)] and cache.resident_bytes == 3 * SIZE
    cache.release(chunk)
    (chunk,) = cache.begin_call(1, [(1, 5), (1, 7)])
    cache.acquire(chunk)
    assert cache.get((1, 5)) == "w(1, 5)" and cache.get((1, 7)) == "w(1, 7)"
    cache.release(chunk)
    assert cache.stats.prefetch_issued == 1 and cache.stats.prefetch_used == 1
    assert cache.stats.peak_bytes <= 3 * SIZE


def test_unused_prefetch_is_cancelled_or_counted_wasted():
    pending: Future = Future()  # never started: cancellable
    cache = ExpertCache(4 * SIZE, size, make_policy("lru"), loader=lambda k: k, min_call_bytes=2 * SIZE)
    assert cache.prefetch([(1, 3)], lambda k: pending) == [(1, 3)]
    for chunk in cache.begin_call(1, [(1, 0), (1, 1)]):  # layer 1 did not need expert 3
        cache.acquire(chunk)
        cache.release(chunk)
    assert pending.cancelled() and (1, 3) not in cache.entries
    assert cache.stats.prefetch_wasted == 1
