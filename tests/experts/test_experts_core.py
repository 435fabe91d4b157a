"""Grouped FFN experts (HF layout), shared experts and heterogeneous expert lists vs hand-written math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import ExpertList, FFNExpert, GroupedFFN, GRUExpert, SharedExperts

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
ACTS = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}


def rows(n, d=8, seed=0, dtype=F64):
    return torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def ffn(activation, seed=0, E=4, backend="auto", dtype=F64):
    torch.default_generator.manual_seed(seed)
    return GroupedFFN(8, 6, E, activation=activation, backend=backend).to(dtype)


def hand_expert(m: GroupedFFN, e: int, x):
    """Expert e written out from the raw weights: gate rows first, then up rows (HF gate_up_proj)."""
    act = ACTS[m.activation]
    if m.gated:
        w = m.gate_up_proj[e]  # (2F, D)
        h = act(x @ w[: m.d_ff].t()) * (x @ w[m.d_ff :].t())
    else:
        h = act(x @ m.up_proj[e].t())
    return h @ m.down_proj[e].t()


# ------------------------------------------------------------------------------------------ GroupedFFN
@pytest.mark.parametrize("activation", list(ACTS))
def test_expert_forward_is_the_hand_formula(activation):
    m = ffn(activation)
    x = rows(5)
    for e in range(4):
        torch.testing.assert_close(m.expert_forward(e, x), hand_expert(m, e, x), rtol=1e-12, atol=1e-12)
    shape = (4, 12, 8) if m.gated else (4, 6, 8)
    assert m.in_proj.shape == shape and m.down_proj.shape == (4, 8, 6)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["grouped_mm", "bmm", "loop", "auto"])
@pytest.mark.parametrize("activation", list(ACTS))
def test_grouped_forward_matches_each_expert(activation, backend, dtype):
    m = ffn(activation, backend=backend, dtype=dtype)
    counts = [2, 0, 5, 1]
    x = rows(8, dtype=dtype)
    got = m(x, torch.tensor(counts))
    want = torch.cat([m.expert_forward(e, part) for e, part in enumerate(x.split(counts))])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm", "loop"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_gradients_match_hand_formula(activation, backend):
    """Input and weight gradients of the grouped path (fused SwiGLU backward, hand-written loop backward)."""
    m = ffn(activation, backend=backend)
    counts = [3, 0, 4, 1]
    x = rows(8).requires_grad_(True)
    g = rows(8, seed=1)
    params = [x, m.in_proj, m.down_proj]
    got = torch.autograd.grad((m(x, torch.tensor(counts)) * g).sum(), params)
    want_y = torch.cat([hand_expert(m, e, part) for e, part in enumerate(x.split(counts))])
    want = torch.autograd.grad((want_y * g).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (got[1][1] == 0).all() and (got[2][1] == 0).all()  # expert 1 has no rows: zero weight gradient


def test_fused_swiglu_gradcheck():
    from moekit.experts.grouped import _SwiGLU

    h = rows(5, d=12).requires_grad_(True)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (h,))


def test_flops_per_token():
    assert ffn("swiglu").flops_per_token() == 2 * 8 * 12 + 2 * 6 * 8
    assert ffn("relu").flops_per_token() == 2 * 8 * 6 + 2 * 6 * 8


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_add_expert_keeps_the_others(activation):
    m = ffn(activation)
    old_in, old_down = m.in_proj.detach().clone(), m.down_proj.detach().clone()
    assert m.add_expert(init_from=2) == 4
    assert m.num_experts == 4 + 1 and m.in_proj.shape[0] == m.down_proj.shape[0] == 5
    assert isinstance(m.in_proj, nn.Parameter) and isinstance(m.down_proj, nn.Parameter)
    assert torch.equal(m.in_proj[:4], old_in) and torch.equal(m.down_proj[:4], old_down)
    assert torch.equal(m.in_proj[4], old_in[2]) and torch.equal(m.down_proj[4], old_down[2])
    assert m.add_expert() == 5  # fresh weights
    assert torch.equal(m.in_proj[:5, :], torch.cat([old_in, old_in[2:3]]))
    assert not torch.equal(m.in_proj[5], old_in[2]) and m.in_proj[5].abs().sum() > 0
    x = rows(6)
    out = m(x, torch.tensor([1, 0, 1, 1, 1, 2]))  # the grown module still runs
    torch.testing.assert_close(out[-2:], m.expert_forward(5, x[-2:]), rtol=1e-12, atol=1e-12)
    assert {n for n, _ in m.named_parameters()} == {"gate_up_proj" if m.gated else "up_proj", "down_proj"}


def test_remove_expert_keeps_the_others():
    m = ffn("swiglu")
    old_in, old_down = m.in_proj.detach().clone(), m.down_proj.detach().clone()
    m.remove_expert(1)
    assert m.num_experts == 3
    assert torch.equal(m.in_proj, old_in[[0, 2, 3]]) and torch.equal(m.down_proj, old_down[[0, 2, 3]])
    m.remove_expert(2)  # the last one
    assert torch.equal(m.in_proj, old_in[[0, 2]])
    with pytest.raises(ValueError, match="e must"):
        m.remove_expert(2)
    m.remove_expert(0)
    with pytest.raises(ValueError, match="last expert"):
        m.remove_expert(0)


def test_grouped_ffn_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        GroupedFFN(8, 6, 4, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        GroupedFFN(8, 6, 4, backend="triton")
    for name, args in (("d_model", (0, 6, 4)), ("d_ff", (8, 0, 4)), ("num_experts", (8, 6, 0))):
        with pytest.raises(ValueError, match=name):
            GroupedFFN(*args)


# ------------------------------------------------------------------------------------------ shared experts
@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_hand_formula(gate):
    torch.default_generator.manual_seed(0)
    m = SharedExperts(8, 3, num_shared=2, gate=gate).double()
    x = rows(5)
    wg, wu, wd = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
    assert wg.shape == wu.shape == (6, 8) and wd.shape == (8, 6)  # two experts of width 3, fused
    want = (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()
    if gate:
        want = torch.sigmoid(x @ m.shared_expert_gate.weight.t()) * want  # (T, 1) per-token scale
    torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)
    assert m.flops_per_token() == 6 * 8 * 6


def test_shared_gate_scales_per_token():
    torch.default_generator.manual_seed(0)
    m = SharedExperts(8, 4, gate=True).double()
    x = rows(3)
    with torch.no_grad():
        m.shared_expert_gate.weight.zero_()  # sigmoid(0) = 1/2 for every token
    ungated = (F.silu(m.gate_proj(x)) * m.up_proj(x)) @ m.down_proj.weight.t()
    torch.testing.assert_close(m(x), ungated / 2, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ heterogeneous
def test_expert_list_routes_rows_to_their_expert():
    torch.default_generator.manual_seed(0)
    experts = [GRUExpert(8, steps=4, hidden=5), FFNExpert(8, 6), nn.Linear(8, 8)]
    m = ExpertList(experts, 8).double()
    counts = [3, 0, 2]
    x = rows(5)
    want = torch.cat([experts[0](x[:3]), experts[2](x[3:])])
    torch.testing.assert_close(m(x, torch.tensor(counts)), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.expert_forward(1, x), experts[1](x), rtol=0, atol=0)
    assert m.num_experts == 3
    empty = m(x[:0], torch.zeros(3, dtype=torch.long))
    assert empty.shape == (0, 8)


def test_gru_expert_rows_are_independent():
    torch.default_generator.manual_seed(0)
    gru = GRUExpert(8, steps=2, hidden=6).double()
    x = rows(4)
    together = gru(x)
    alone = torch.cat([gru(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        GRUExpert(8, steps=3, hidden=4)


def test_ffn_expert_hand_formula():
    torch.default_generator.manual_seed(0)
    e = FFNExpert(8, 5).double()
    x = rows(3)
    want = (F.silu(x @ e.gate_proj.weight.t()) * (x @ e.up_proj.weight.t())) @ e.down_proj.weight.t()
    torch.testing.assert_close(e(x), want, rtol=1e-12, atol=1e-12)


def test_expert_list_bad_experts():
    with pytest.raises(ValueError, match="experts"):
        ExpertList([], 8)
    with pytest.raises(TypeError, match="experts"):
        ExpertList(FFNExpert(8, 4), 8)
    with pytest.raises(TypeError, match=r"experts\[1\]"):
        ExpertList([FFNExpert(8, 4), lambda x: x], 8)
    with pytest.raises(ValueError, match=r"experts\[1\].*d_model=8"):
        ExpertList([FFNExpert(8, 4), FFNExpert(6, 4)], 8)  # wrong input width
    with pytest.raises(ValueError, match=r"experts\[0\]"):
        ExpertList([nn.Linear(8, 4), FFNExpert(8, 4)], 8)  # wrong output width
