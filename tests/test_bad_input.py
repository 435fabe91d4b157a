"""Bad arguments and inputs raise ValueError/TypeError naming the argument; empty batches just work."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moekit import MoELayer, TopKRouter, available_routers
from moekit.experts import FFNExpert, GRUExpert

pytestmark = pytest.mark.usefixtures("one_thread")


def layer(**kw):
    return MoELayer(**{"d_model": 8, "d_ff": 8, "num_experts": 4, "k": 2, **kw})


# ------------------------------------------------------------------------------------------ constructor
@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(k=5), ValueError, r"\bk\b.*num_experts"),
        (dict(k=0), ValueError, r"\bk\b"),
        (dict(k=-1), ValueError, r"\bk\b"),
        (dict(k=1.5), TypeError, r"\bk\b"),
        (dict(k=True), TypeError, r"\bk\b"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(d_model=0), ValueError, "d_model"),
        (dict(capacity_factor=0), ValueError, "capacity_factor"),
        (dict(capacity_factor=-0.5), ValueError, "capacity_factor"),
        (dict(capacity_factor=math.nan), ValueError, "capacity_factor"),
        (dict(capacity_factor=math.inf), ValueError, "capacity_factor"),
        (dict(capacity_factor="1.0"), ValueError, "capacity_factor"),
        (dict(eval_capacity_factor=0.0), ValueError, "eval_capacity_factor"),
        (dict(drop_policy="random"), ValueError, "drop_policy"),
        (dict(min_capacity=-1), ValueError, "min_capacity"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(router="no_such_router"), ValueError, "router"),
        (dict(router=3), TypeError, "router"),
        (dict(d_ff=None), ValueError, "d_ff"),
        (dict(d_ff=0), ValueError, "d_ff"),
        (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v!r}" for k, v in v.items()),
)
def test_bad_constructor_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        layer(**kw)


def test_router_instance_with_other_num_experts():
    with pytest.raises(ValueError, match="num_experts"):
        layer(router=TopKRouter(8, 6, k=2))


def test_bad_expert_lists():
    with pytest.raises(ValueError, match="experts"):
        layer(d_ff=None, experts=[])
    with pytest.raises(ValueError, match="experts"):
        layer(d_ff=None, experts=[FFNExpert(8, 4)] * 3)  # 3 modules for num_experts=4
    wrong_in = [GRUExpert(8, 2, 4), FFNExpert(6, 4)]
    with pytest.raises(ValueError, match=r"experts\[1\].*d_model=8"):
        layer(d_ff=None, num_experts=2, experts=wrong_in)
    wrong_out = [GRUExpert(8, 2, 4), nn.Linear(8, 5)]
    with pytest.raises(ValueError, match=r"experts\[1\]"):
        layer(d_ff=None, num_experts=2, experts=wrong_out)


# ------------------------------------------------------------------------------------------ forward inputs
@pytest.fixture
def moe():
    torch.default_generator.manual_seed(0)
    return layer(check_finite=True)


def test_wrong_last_dimension(moe):
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(2, 8, 3))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool, torch.complex64])
def test_non_real_float_input(moe, dtype):
    with pytest.raises(TypeError, match="x must"):
        moe(torch.ones(3, 8, dtype=dtype))


def test_not_a_tensor(moe):
    with pytest.raises(TypeError, match="x must"):
        moe([[0.0] * 8])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_with_check_finite(moe, bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        moe(x)
    moe.check_finite = False
    moe(x)  # not checked: runs (and propagates the value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_check_finite_ignores_masked_positions(moe, bad):
    x = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x[0, 2, 1] = bad  # padding may hold anything
    x[1, 1] = bad
    out = moe(x, mask)
    assert torch.isfinite(out.output).all()
    assert (out.output[~mask] == 0).all()  # masked tokens get zero MoE output, not the bad value
    x[1, 0, 5] = bad  # ... but a real token may not
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        moe(x, mask)


def test_bad_masks(moe):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="mask"):
        moe(x, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        moe(x, torch.ones(2, 3, 8, dtype=torch.bool))
    for dtype in (torch.float32, torch.long, torch.uint8):
        with pytest.raises(TypeError, match="mask"):
            moe(x, torch.ones(2, 3, dtype=dtype))


def test_bad_token_ids(moe):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x, token_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="token_ids"):
        moe(x, token_ids=torch.zeros(2, 3))


def test_hash_routing_needs_token_ids(make_layer):
    hashed = make_layer("hash", k=1)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="token_ids"):
        hashed(x)
    hashed(x, token_ids=torch.arange(6).reshape(2, 3))


# ------------------------------------------------------------------------------------------ empty batches
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)], ids=["0-D", "2-0-D"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("router", available_routers())
def test_empty_batch(make_layer, router, training, shape):
    moe = make_layer(router, capacity_factor=1.0).train(training)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ids = torch.zeros(shape[:-1], dtype=torch.long)
    out = moe(x, torch.ones(shape[:-1], dtype=torch.bool), token_ids=ids)
    assert out.output.shape == shape
    assert out.stats["tokens_per_expert"].tolist() == [0] * 4 and out.stats["num_tokens"] == 0
    assert all(torch.isfinite(v).all() for v in out.stats.values())
    (out.output.sum() + out.aux_loss).backward()
    assert x.grad.shape == shape
    out = moe(x, token_ids=ids)  # without a mask
    assert out.output.shape == shape
    (out.output.sum() + out.aux_loss).backward()


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "with-shared"])
def test_empty_batch_heterogeneous(shared):
    torch.default_generator.manual_seed(0)
    kw = dict(num_shared_experts=1, shared_d_ff=4, shared_gate=True) if shared else {}
    moe = layer(d_ff=None, num_experts=2, experts=[GRUExpert(8, 2, 4), FFNExpert(8, 4)], **kw)
    x = torch.randn(0, 8, requires_grad=True)
    out = moe(x)
    assert out.output.shape == (0, 8)
    (out.output.sum() + out.aux_loss).backward()
    assert x.grad.shape == (0, 8)
