"""LMConfig: validation names the field, serialisation round-trips, dense baseline sizes."""

from __future__ import annotations

import json

import pytest

from moekit.models import LMConfig


def tiny(**kw) -> LMConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_experts=4, k=2, max_seq_len=32)
    base.update(kw)
    return LMConfig(**base)


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("d_model", 30),  # not divisible by n_heads=4
        ("d_model", 1.5),
        ("n_layers", 0),
        ("n_heads", True),
        ("n_kv_heads", 3),  # does not divide n_heads=4
        ("n_kv_heads", 0),
        ("max_seq_len", 0),
        ("rope_theta", 0.0),
        ("d_ff", -1),
        ("num_experts", -1),
        ("k", 0),
        ("k", 5),  # > num_experts
        ("moe_every", 0),
        ("moe_every", 3),  # > n_layers: no MoE layer at all
        ("router", "no_such_router"),
        ("router_options", [1]),
        ("capacity_factor", 0),
        ("num_shared_experts", -1),
        ("shared_gate", 1),
        ("dense_d_ff", 0),
        ("loss_weights", {"z_loss": "big"}),
        ("tie_embeddings", "yes"),
        ("norm_eps", -1e-5),
    ],
)
def test_validation_error_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LMConfig\.{field}"):
        tiny(**{field: value})


def test_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="head dim"):
        tiny(d_model=36, n_heads=4)  # head dim 9 cannot be rotated in pairs


def test_dense_model_ignores_k_bound():
    cfg = tiny(num_experts=0, k=2)
    assert cfg.dense_width == 2 * 64
    assert not any(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def test_moe_every_selects_layers():
    cfg = tiny(n_layers=4, moe_every=2)
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


def test_to_dict_from_dict_round_trip_through_json():
    cfg = tiny(router_options={"bias": True}, loss_weights={"z_loss": 0.0}, n_kv_heads=2, capacity_factor=1.25)
    again = LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_rejects_unknown_keys_by_name():
    d = tiny().to_dict()
    d["n_expert"] = 8
    d["dropout"] = 0.1
    with pytest.raises(ValueError, match=r"dropout.*n_expert"):
        LMConfig.from_dict(d)


def test_from_dict_requires_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        LMConfig.from_dict({"d_model": 32})


def test_config_is_frozen_and_owns_its_dicts():
    options = {"bias": True}
    cfg = tiny(router_options=options)
    options["bias"] = False
    assert cfg.router_options == {"bias": True}
    with pytest.raises(AttributeError):
        cfg.d_model = 64  # type: ignore[misc]


def test_dense_baseline_widths():
    cfg = tiny(num_shared_experts=1)
    dense = cfg.dense_baseline()
    assert dense.num_experts == 0
    assert dense.dense_d_ff == dense.dense_width == (2 + 1) * 64
    assert dense.d_model == cfg.d_model and dense.n_layers == cfg.n_layers


def test_dense_baseline_refuses_mismatched_dense_layers():
    cfg = tiny(moe_every=2, dense_d_ff=100)  # dense layers wider than the MoE layers' active width
    with pytest.raises(ValueError, match="dense_d_ff"):
        cfg.dense_baseline()
    assert tiny(dense_d_ff=100).dense_baseline().dense_d_ff == 128  # every layer MoE: dense_d_ff is unused
