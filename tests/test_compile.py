"""torch.compile of the default layer gives the eager numbers (dynamo with the "eager" backend: fast on CPU).

Float32 on CPU is the case that matters: eager auto-dispatch picks torch._grouped_mm there, whose fake-tensor
kernel accepts only bfloat16, so the compiled path must choose another backend by itself.
"""

from __future__ import annotations

import pytest
import torch

from moekit import MoELayer

pytestmark = pytest.mark.usefixtures("one_thread")


def run(fn, layer, x, mask, g):
    out = fn(x, mask)
    scalar = (out.output * g).sum() + out.aux_loss
    grads = torch.autograd.grad(scalar, [x, *layer.parameters()])
    return out, grads


def test_compiled_default_layer_matches_eager():
    torch._dynamo.reset()
    torch.default_generator.manual_seed(0)
    layer = MoELayer(8, 8, 4, k=2)  # all defaults: topk router, dropless, auto backend, float32
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    g = torch.randn(2, 5, 8, generator=gen)
    compiled = torch.compile(layer, backend="eager")
    want, want_grads = run(layer, layer, x, mask, g)
    for _ in range(2):  # the second call runs the cached graphs
        got, got_grads = run(compiled, layer, x, mask, g)
        torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-7)
        for name in want.losses:
            torch.testing.assert_close(got.losses[name], want.losses[name], rtol=1e-5, atol=1e-7)
        assert got.stats["tokens_per_expert"].tolist() == want.stats["tokens_per_expert"].tolist()
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the capacity path, in eval mode (recompiles for the new branch)
    layer.capacity_factor = layer.eval_capacity_factor = 0.5
    layer.eval()
    with torch.no_grad():
        got, want = compiled(x, mask), layer(x, mask)
    torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-6)
    assert got.stats["dropped_per_expert"].tolist() == want.stats["dropped_per_expert"].tolist()
    assert int(want.stats["dropped_per_expert"].sum()) > 0
