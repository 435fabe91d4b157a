"""Grouped GEMM backends against per-expert slice-and-matmul, forward and backward, with empty groups."""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch import available_backends, grouped_linear
from moekit.dispatch.backends import _grouped_mm_works, check_backend, resolve_backend

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["grouped_mm", "bmm", "loop", "auto"]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
GROUPED_MM_F32 = _grouped_mm_works("cpu", torch.float32)
COUNTS = [
    [3, 5, 2, 4],
    [0, 6, 0, 8],  # empty groups first and in the middle
    [7, 0, 7, 0],  # ... and last
    [0, 0, 14, 0],  # a single expert takes every row
    [1, 1, 1, 11],
]


def by_hand(x, w, counts):
    """Rows [start, start + n) of expert e times w[e]^T, one slice at a time."""
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x[start : start + n] @ w[e].t())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("counts", COUNTS, ids=[str(c) for c in COUNTS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_per_expert_matmul(backend, counts, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 8, dtype=dtype, generator=gen, requires_grad=True)
    w = torch.randn(4, 12, 8, dtype=dtype, generator=gen, requires_grad=True)  # (E, out, in)
    g = torch.randn(sum(counts), 12, dtype=dtype, generator=gen)
    got = grouped_linear(x, w, torch.tensor(counts), backend)
    want = by_hand(x, w, counts)
    torch.testing.assert_close(got, want, **TOL[dtype])
    got_grads = torch.autograd.grad((got * g).sum(), [x, w])
    want_grads = torch.autograd.grad((want * g).sum(), [x, w])
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for e, n in enumerate(counts):
        if n == 0:
            assert (got_grads[1][e] == 0).all()  # an expert without rows gets a zero weight gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    x = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    y = grouped_linear(x, w, torch.zeros(4, dtype=torch.long), backend)
    assert y.shape == (0, 12)
    y.sum().backward()  # still part of the graph
    assert x.grad.shape == (0, 8) and (w.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["x", "w"])
def test_gradient_of_one_operand_only(backend, needs):
    """Frozen experts (or a frozen input) still get the other operand's gradient right."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 8, dtype=torch.float64, generator=gen, requires_grad=needs == "x")
    w = torch.randn(3, 4, 8, dtype=torch.float64, generator=gen, requires_grad=needs == "w")
    counts = [4, 0, 5]
    (got,) = torch.autograd.grad(grouped_linear(x, w, torch.tensor(counts), backend).sum(), [x if needs == "x" else w])
    (want,) = torch.autograd.grad(by_hand(x, w, counts).sum(), [x if needs == "x" else w])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_resolve_backend():
    f32 = torch.randn(4, 8), torch.randn(2, 16, 8)
    f64 = torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 16, 8, dtype=torch.float64)
    assert resolve_backend("auto", *f32) == ("grouped_mm" if GROUPED_MM_F32 else "loop")
    assert resolve_backend("auto", *f64) == "loop"  # no float64 grouped_mm kernel
    assert resolve_backend("grouped_mm", *f64) == "bmm"  # an explicit request degrades to the same math
    unaligned = torch.randn(4, 6), torch.randn(2, 16, 6)  # 24-byte rows: not 16-byte aligned
    assert resolve_backend("auto", *unaligned) == "loop"
    for name in ("bmm", "loop"):
        assert resolve_backend(name, *f32) == name


@pytest.mark.skipif(not GROUPED_MM_F32, reason="torch._grouped_mm does not run float32 on this CPU build")
def test_grouped_mm_is_really_used_for_float32(monkeypatch):
    """The float32 grouped_mm tests above exercise torch._grouped_mm, not a fallback."""
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    grouped_linear(torch.randn(6, 8), torch.randn(3, 16, 8), torch.tensor([2, 0, 4]), "grouped_mm")
    assert calls == [(6, 8)]


def test_backend_names():
    assert available_backends() == ["grouped_mm", "bmm", "loop"]
    for name in [*available_backends(), "auto"]:
        check_backend(name)
    with pytest.raises(ValueError, match="backend"):
        check_backend("cutlass")
