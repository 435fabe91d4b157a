"""Grouped GEMM backends: rows of ``x`` sorted by expert, one weight matrix per expert.

``grouped_linear(x, w, counts, backend)`` computes, for each expert e, ``x[rows of e] @ w[e].T``:

- ``"grouped_mm"``: one ``torch._grouped_mm`` call (float32/bfloat16/float16; CUDA or CPU builds that have it).
- ``"bmm"``: pad each expert's rows to the largest group, one batched matmul, unpad.
- ``"loop"``: one ``F.linear`` per non-empty expert (works for every dtype and device).

All three give the same numbers up to float rounding; the tests hold them to the per-token reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("grouped_mm", "bmm", "loop")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available_backends() -> list[str]:
    """Backend names accepted by ``MoELayer(backend=...)`` (plus ``"auto"``)."""
    return list(BACKENDS)


def check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


@torch.compiler.assume_constant_result  # a plain bool to torch.compile, which must not trace the probe
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype) whether ``torch._grouped_mm`` runs forward and backward here."""
    return _probe_grouped_mm(device_type, dtype)


@functools.cache
def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if dtype not in _GROUPED_MM_DTYPES or not hasattr(torch, "_grouped_mm"):
        return False
    # Grad is forced on: a first call under no_grad must not cache 'unsupported' for the whole process.
    try:
        with torch.enable_grad():
            # Deterministic operands: the probe must not advance the global RNG (seeded runs would differ).
            x = torch.ones(16, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
            y = torch._grouped_mm(x, w, offs=offs)
            y.backward(torch.ones_like(y))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def resolve_backend(backend: str, x: Tensor, w: Tensor) -> str:
    """Pick the backend for these operands: ``auto`` prefers grouped_mm where it works, else loop."""
    if backend == "auto":
        return "grouped_mm" if _supports_grouped_mm(x, w) else "loop"
    if backend == "grouped_mm" and not _supports_grouped_mm(x, w):
        # An explicit request that cannot run here degrades to the padded bmm, which computes the same thing.
        return "bmm"
    return backend


def _supports_grouped_mm(x: Tensor, w: Tensor) -> bool:
    if x.dtype != w.dtype or not _grouped_mm_works(x.device.type, x.dtype):
        return False
    # torch.compile traces with fake tensors, so the op's meta kernel must take the dtype too; it can be
    # narrower than the eager kernel (bfloat16 only in torch 2.13, while the CPU kernel runs float32).
    if torch.compiler.is_compiling() and not _grouped_mm_works("meta", x.dtype):
        return False
    # The kernels want 16-byte aligned row strides.
    return (x.shape[-1] * x.element_size()) % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0


def grouped_linear(x: Tensor, w: Tensor, counts: Tensor, backend: str = "auto") -> Tensor:
    """(P, in) rows sorted by expert, w (E, out, in), counts (E,) -> (P, out)."""
    backend = resolve_backend(backend, x, w)
    if x.shape[0] == 0:
        return x.matmul(w[0].t())  # (0, out), kept in the autograd graph so that backward still runs
    if backend == "grouped_mm":
        return _grouped_mm(x, w, counts)
    if backend == "bmm":
        return _padded_bmm(x, w, counts)
    return _loop(x, w, counts)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward requires it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.contiguous()


def _grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each group
    y = torch._grouped_mm(x.contiguous(), w.transpose(1, 2), offs=offs)  # (P, out)
    return _ContiguousGrad.apply(y)


def _loop(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        # Dynamo traces plain ops; the hand-written backward below reads sizes on the host, which it cannot.
        rows = x.split(counts.tolist())
        outs = [F.linear(x_e, w_e) for x_e, w_e in zip(rows, w.unbind(0), strict=True) if x_e.shape[0]]
        return torch.cat(outs, dim=0)
    return _LoopLinear.apply(x, w, counts)


class _LoopLinear(torch.autograd.Function):
    """One ``mm`` per non-empty expert, each writing straight into its rows of a preallocated output.

    Autograd on slices would build a full-size zero gradient per slice and a ``cat``/``stack`` per backward;
    here the forward, ``dx`` and ``dw`` each fill one buffer (empty experts get a zero weight gradient).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, counts: Tensor) -> Tensor:  # noqa: D102
        sizes = counts.tolist()  # one host sync: the loop needs the group sizes
        x = x.contiguous()
        out = x.new_empty(x.shape[0], w.shape[1])  # (P, out)
        for e, (start, stop) in enumerate(_bounds(sizes)):
            if stop > start:
                torch.mm(x[start:stop], w[e].t(), out=out[start:stop])
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: D102
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        gx = torch.empty_like(x) if need_x else None  # (P, in)
        gw = torch.empty_like(w) if need_w else None  # (E, out, in)
        for e, (start, stop) in enumerate(_bounds(ctx.sizes)):
            if stop == start:
                if gw is not None:
                    gw[e].zero_()
                continue
            g_e = grad[start:stop]  # (n, out)
            if gx is not None:
                torch.mm(g_e, w[e], out=gx[start:stop])
            if gw is not None:
                torch.mm(g_e.t(), x[start:stop], out=gw[e])
        return gx, gw, None


def _bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """[start, stop) row range of each group."""
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


def _padded_bmm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    E = w.shape[0]
    n_max = int(counts.max())
    starts = counts.cumsum(0) - counts  # (E,)
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # (P,)
    slot_of_row = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]  # (P,)
    padded = x.new_zeros(E, n_max, x.shape[1])  # (E, n_max, in)
    padded = padded.index_put((expert_of_row, slot_of_row), x)
    # w @ x^T then transpose: the weight gradient comes out in w's own layout (no (E, out, in) copy in backward).
    y = torch.bmm(w, padded.transpose(1, 2)).transpose(1, 2)  # (E, n_max, out)
    return y[expert_of_row, slot_of_row]
