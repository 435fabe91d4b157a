"""The edge runtime: the resident model's logits and tokens for every cache and prefetch setting, budgets
kept, hit counts equal to the replayed trace, prefetch accuracy measured, int8 and Hugging Face models."""

from __future__ import annotations

import pytest
import torch

from moekit.inference import (
    CACHE_MODES,
    EdgeModel,
    ExpertStore,
    OffloadedExperts,
    build_expert_store,
    decode_stream,
    ensure_store,
    make_policy,
    min_call_bytes,
    record_routing,
    simulate,
)

PROMPT = 6  # as in conftest.py

SETTINGS = [(c, p) for c in CACHE_MODES for p in (False, True) if not (c == "naive" and p)]


@pytest.mark.parametrize(("cache", "prefetch"), SETTINGS)
def test_same_logits_as_resident_and_budget_kept(store_dir, reference, ids, cache, prefetch, budget="35%"):
    ref, rec = reference
    with EdgeModel(store_dir, memory_budget=budget, cache=cache, prefetch=prefetch, trace=rec.trace) as edge:
        out = decode_stream(edge.model, ids, PROMPT)
        summary = edge.summary()
        assert edge.cache.stats.peak_bytes <= edge.settings.budget_bytes
        assert edge.cache.resident_bytes <= edge.settings.budget_bytes
    assert torch.equal(out.logits, ref.logits)
    assert summary["peak_resident_expert_bytes"] <= summary["budget_bytes"]
    assert summary["accesses"] == sum(len(experts) for _, experts in rec.trace)
    if prefetch:
        assert 0 <= summary["prefetch_recall"] <= 1 and 0 <= summary["prefetch_precision"] <= 1
        assert summary["prefetch_issued"] > 0
    else:
        assert summary["prefetch_recall"] is None
    if cache == "naive":
        assert summary["hits"] == 0 and summary["loads"] == summary["accesses"]


@pytest.mark.parametrize("cache", ["lru", "committee", "least_stale", "belady"])
def test_greedy_generation_gives_the_same_tokens(lm, store_dir, cache):
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = lm.generate(prompt, 12, temperature=0.0)
    trace = record_routing(lm, lambda: lm.generate(prompt, 12, temperature=0.0)).trace
    with EdgeModel(store_dir, memory_budget="25%", cache=cache, prefetch=True, trace=trace) as edge:
        got = edge.generate(prompt, 12, temperature=0.0)
        assert edge.telemetry.tokens == 12 and edge.summary()["tokens_per_s"] > 0
    assert torch.equal(got, expected)


def test_runtime_hits_equal_the_replayed_trace(store_dir, reference, ids):
    _, rec = reference
    for cache in ("lru", "lfu", "least_stale", "belady"):
        with EdgeModel(store_dir, memory_budget="40%", cache=cache, trace=rec.trace) as edge:
            decode_stream(edge.model, ids, PROMPT)
            got = edge.cache.stats
            budget, store = edge.settings.budget_bytes, edge.store
        replay = simulate(rec.trace, make_policy(cache, trace=rec.trace), budget, store.nbytes, min_call_bytes(store))
        assert (got.hits, got.accesses, got.loads) == (replay.hits, replay.accesses, replay.loads), cache


def test_experts_are_not_resident_and_reads_are_counted(store_dir, ids):
    with EdgeModel(store_dir, memory_budget="25%", cache="lru", storage_mbps=10_000.0) as edge:
        layers = edge.model.moe_layers()
        assert all(isinstance(layer.experts, OffloadedExperts) for _, layer in layers)
        assert not any("experts" in name for name, _ in edge.model.named_parameters())
        assert edge.settings.page_cache_dropped == 25
        decode_stream(edge.model, ids, PROMPT, after_prefill=edge.reset_stats)
        s = edge.summary()
    file_bytes = ExpertStore(store_dir).expert_file((0, 0)).file_bytes
    assert s["bytes_read"] == s["loads"] * file_bytes and s["loads"] == s["accesses"] - s["hits"]
    assert s["storage_mbps"] == 10_000.0 and len(s["hit_rate_per_layer"]) == 3


def test_committee_pins_the_most_used_experts(store_dir, ids):
    store = ExpertStore(store_dir)
    with EdgeModel(store, memory_budget="50%", cache="committee") as edge:
        pinned = edge.cache.policy.pinned
        assert edge.settings.pinned == len(pinned) > 0 and edge.settings.startup_bytes > 0
        decode_stream(edge.model, ids, PROMPT)
        assert all(k in edge.cache.entries for k in pinned)
    usage = store.usage
    top = max((c, (layer, e)) for layer, counts in enumerate(usage) for e, c in enumerate(counts))[1]
    assert top in pinned


def test_committee_needs_usage_and_belady_a_trace(lm, tmp_path):
    build_expert_store(lm, tmp_path / "s")
    with pytest.raises(ValueError, match="calibration usage"):
        EdgeModel(tmp_path / "s", cache="committee")
    with pytest.raises(ValueError, match="trace"):
        EdgeModel(tmp_path / "s", cache="belady")
    with pytest.raises(ValueError, match="naive"):
        EdgeModel(tmp_path / "s", cache="naive", prefetch=True)
    with EdgeModel(tmp_path / "s", cache="committee", pinned=[(0, 1)], memory_budget="50%") as edge:
        assert edge.cache.policy.pinned == {(0, 1)}


def test_prefetch_predicts_the_next_layer(store_dir, reference, ids):
    ref, _ = reference
    with EdgeModel(store_dir, memory_budget="100%", cache="lru", prefetch=True) as edge:
        out = decode_stream(edge.model, ids, PROMPT, after_prefill=edge.reset_stats)
        t = edge.telemetry
    assert torch.equal(out.logits, ref.logits)
    assert t.used_total == 2 * 2 * (ids.shape[1] - PROMPT)  # layers 1 and 2 predicted, k = 2, per step
    assert t.pred_total > 0 and t.pred_true <= min(t.pred_total, t.used_total)


def test_expert_forward_goes_through_the_cache(lm, store_dir):
    x = torch.randn(3, 32)
    with EdgeModel(store_dir, memory_budget="25%") as edge:
        offloaded = edge.model.moe_layers()[1][1].experts
        got = offloaded.expert_forward(4, x)
        assert edge.cache.stats.accesses == 1
    assert torch.equal(got, lm.moe_layers()[1][1].experts.expert_forward(4, x))


def test_int8_experts_are_close(lm, tmp_path, reference, ids):
    ref, _ = reference
    build_expert_store(lm, tmp_path / "q", quantization="int8")
    with EdgeModel(tmp_path / "q", memory_budget="50%", cache="lru", prefetch=True) as edge:
        out = decode_stream(edge.model, ids, PROMPT)
        assert edge.cache.stats.peak_bytes <= edge.settings.budget_bytes
    err = (out.logits - ref.logits).abs().max()
    assert 0 < err < 0.05 * ref.logits.abs().max()


def test_hf_mixtral_through_interop(tmp_path):
    transformers = pytest.importorskip("transformers")
    interop = pytest.importorskip("moekit.interop")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "hf")

    def load():
        model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
        interop.patch_hf_model(model)
        return model

    model = load()
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    store = build_expert_store(model, tmp_path / "store")
    assert not any("experts" in n for n in store.load_resident())
    with EdgeModel(store, model=load(), memory_budget="30%", cache="lru", prefetch=True) as edge:
        got = edge.generate(prompt, 8, do_sample=False)
        assert edge.cache.stats.peak_bytes <= edge.settings.budget_bytes
        assert not any("experts" in name for name, _ in edge.model.named_parameters())
    assert torch.equal(got, expected)


def test_ensure_store_builds_once_with_usage(lm, tmp_path):
    calls = []

    def load():
        calls.append(1)
        return lm

    calib = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(4))
    store = ensure_store(tmp_path / "s", load, calibration_ids=calib)
    assert store.usage is not None and sum(map(sum, store.usage)) == 2 * 20 * 3  # k pairs per token per layer
    again = ensure_store(tmp_path / "s", load)
    assert len(calls) == 1 and again.expert_bytes == store.expert_bytes
    with EdgeModel(again, cache="committee", memory_budget="50%") as edge:
        assert edge.settings.pinned > 0  # usage recorded, no calibration trace: 75% of the spare budget
