"""Expert-specialization counts and report."""

from __future__ import annotations

import pytest
import torch
from training_helpers import tiny_model

from moekit.data import Batch
from moekit.training.specialization import collect_counts, specialization_markdown, specialization_report

CATS = ("even", "odd")
PARTS = ("law", "poetry")


def _batch(ids: torch.Tensor, parts: torch.Tensor) -> Batch:
    pad = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    tokens = torch.cat([ids, pad], dim=1)
    part_ids = torch.cat([parts, pad], dim=1)
    return Batch(tokens, part_ids, torch.zeros_like(tokens), torch.zeros(ids.shape[0], dtype=torch.long))


def test_counts_and_report_with_hash_routing():
    model = tiny_model(router="hash", k=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 16), generator=g)
    parts = torch.randint(-1, 2, (3, 16), generator=g)  # -1 = unknown origin
    cats = [i % 2 for i in range(64)]
    counts = collect_counts(model, [_batch(ids, parts)], cats, len(CATS), len(PARTS))
    assert set(counts) == {"blocks.0.ffn", "blocks.1.ffn"}
    for c in counts.values():
        assert int(c.token.sum()) == ids.numel()  # k = 1: one pair per token
        assert torch.equal(c.token.sum(0), torch.bincount(ids.reshape(-1), minlength=64))
        assert torch.equal(c.category.sum(0), torch.bincount(ids.reshape(-1) % 2, minlength=2))
        assert int(c.part[:, 2].sum()) == int((parts == -1).sum())  # unknown part -> last column
    pieces = [f"t{i}" for i in range(64)]
    report = specialization_report(counts, pieces, CATS, PARTS, top_tokens=3)
    layer = report["layers"]["blocks.0.ffn"]
    assert sum(e["load_share"] for e in layer["experts"]) == pytest.approx(1.0)
    for e in layer["experts"]:
        for t in e["top_tokens"]:
            assert t["share_of_token"] == 1.0  # hash routing: each token id always goes to the same expert
        if e["pairs"]:
            assert sum(e["category_share"].values()) == pytest.approx(1.0)
    md = specialization_markdown(report)
    assert md.startswith("## Expert specialization") and "### blocks.1.ffn" in md and "Category lift" in md


def test_learned_router_counts_k_pairs_and_restores_mode():
    model = tiny_model()
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    counts = collect_counts(model, [_batch(ids, torch.zeros_like(ids))], [0] * 64, 2, 2)
    assert all(int(c.token.sum()) == 2 * ids.numel() for c in counts.values())
    assert model.training  # put back in training mode
    assert not any(layer.router._forward_hooks for _, layer in model.moe_layers())  # hooks removed
    with pytest.raises(ValueError, match="no MoE layers"):
        collect_counts(tiny_model(num_experts=0), [], [0] * 64, 2, 2)
