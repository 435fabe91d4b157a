"""Single-process pieces of moekit.parallel: the cost model, shard ranges, regrouping permutations."""

from __future__ import annotations

import pytest
import torch

from moekit.parallel.cost_model import EXAMPLES, bytes_from_splits, ep_cost, worked_examples
from moekit.parallel.ep_layer import _expert_major_perm, _rank_within_groups
from moekit.parallel.mesh import config_hash, shard_range


def test_cost_model_formula():
    c = ep_cost(tokens=1024, d_model=512, num_experts=8, k=2, ep_size=4, dtype_bytes=2, bandwidth_GBps=10.0)
    per_a2a = 1024 * 2 * 3 / 4 * 512 * 2  # pairs x remote share x row bytes
    assert c.bytes_per_a2a == per_a2a
    assert c.bytes_forward == c.bytes_backward == 2 * per_a2a and c.bytes_per_layer == 4 * per_a2a
    assert c.time_per_a2a_s == pytest.approx(per_a2a / 10e9)
    assert ep_cost(1024, 512, 8, 2, 1, 2, 10.0).bytes_per_layer == 0  # EP=1 sends nothing
    # capacity: cf 0.5 keeps half of the rows under balanced routing; cf >= 1 keeps all of them
    assert ep_cost(1024, 512, 8, 2, 4, 2, 10.0, capacity_factor=0.5).kept_pairs == 1024
    assert ep_cost(1024, 512, 8, 2, 4, 2, 10.0, capacity_factor=1.25).kept_pairs == 2048
    assert bytes_from_splits([3, 5, 0, 2], rank=1, d_model=4, dtype_bytes=4) == 5 * 16


def test_cost_model_worked_examples():
    ex = worked_examples(bandwidth_GBps=50.0, latency_s=0.0)
    switch, gshard = ex["switch_base_128"], ex["gshard_600b"]
    assert switch["bytes_per_a2a"] == 8192 * 15 / 16 * 768 * 2
    assert gshard["bytes_per_a2a"] == pytest.approx(2048 * 2 * 2047 / 2048 * 1024 * 2)
    assert gshard["time_per_layer_s"] == pytest.approx(4 * gshard["bytes_per_a2a"] / 50e9)
    assert set(ex) == set(EXAMPLES)


def test_cost_model_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divid"):
        ep_cost(16, 8, 6, 2, 4, 2, 1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        ep_cost(16, 8, 8, 2, 4, 2, 0.0)


def test_shard_range():
    assert [shard_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel size 4"):
        shard_range(6, 4, 0)


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_rank_within_groups():
    key = torch.tensor([2, 0, 2, 1, 0, 2])
    assert _rank_within_groups(key, 3).tolist() == [0, 0, 1, 0, 1, 2]
    assert _rank_within_groups(torch.empty(0, dtype=torch.long), 3).numel() == 0


def test_expert_major_perm():
    blocks = torch.tensor([[2, 1], [0, 3], [1, 1]])  # (sources, local experts) row counts
    rows = torch.cat([torch.full((int(n),), 10 * s + e) for s in range(3) for e, n in enumerate(blocks[s])])
    perm = _expert_major_perm(blocks)
    expert_major = rows[perm]
    want = torch.cat([torch.full((int(blocks[s, e]),), 10 * s + e) for e in range(2) for s in range(3)])
    assert torch.equal(expert_major, want)
    assert _expert_major_perm(blocks[:, :1]) is None and _expert_major_perm(blocks[:1]) is None
