"""All experts of a layer as 3-D weight tensors, computed with one grouped GEMM per projection.

The layout is Hugging Face's (Mixtral / Qwen3-MoE / OLMoE in transformers >= 5):
``gate_up_proj`` (E, 2*F, D) holds the gate rows then the up rows, ``down_proj`` (E, D, F). So HF weights load
as views, with no copy and no transpose. The GELU variant has ``up_proj`` (E, F, D) and ``down_proj`` (E, D, F).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch.backends import check_backend, grouped_linear

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of h = [gate | up] (n, 2F) -> (n, F), whose backward fills one (n, 2F) gradient.

    The autograd of ``h.chunk(2)`` would join the two halves' gradients with a ``cat`` (a copy of the largest
    activation of the layer); here each half is written in place.
    """

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:  # noqa: D102
        gate, up = h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)  # (n, F), kept for backward as autograd would
        ctx.save_for_backward(h, silu_gate)
        return silu_gate * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        h, silu_gate = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)  # (n, 2F)
        d_gate, d_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, silu_gate, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return grad_h


class GroupedFFN(nn.Module):
    """E feed-forward experts of width ``d_ff`` sharing one grouped GEMM.

    ``forward(x, counts)``: x (S, D) rows already sorted by expert, counts (E,) rows per expert -> (S, D).
    ``expert_forward(e, x)``: one expert on (n, D) rows, written plainly; the reference loop and the edge
    runtime use it.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        activation: str = "swiglu",
        backend: str = "auto",
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_backend(backend)
        self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
        self.activation, self.backend = activation, backend
        self.gated = activation in ("swiglu", "geglu")
        up_rows = 2 * d_ff if self.gated else d_ff
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, up_rows, d_model))  # (E, 2F, D)
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, up_rows, d_model))  # (E, F, D)
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))  # (E, D, F)
        self.reset_parameters(init_std)

    @property
    def in_proj(self) -> Tensor:
        return self.gate_up_proj if self.gated else self.up_proj

    def reset_parameters(self, init_std: float | None = None) -> None:
        std_in = init_std if init_std is not None else 1.0 / math.sqrt(self.d_model)
        std_out = init_std if init_std is not None else 1.0 / math.sqrt(self.d_ff)
        nn.init.normal_(self.in_proj, std=std_in)
        nn.init.normal_(self.down_proj, std=std_out)

    def _act(self, h: Tensor) -> Tensor:
        if self.activation == "swiglu":
            if torch.compiler.is_compiling() or h.dim() != 2:
                gate, up = h.chunk(2, dim=-1)
                return F.silu(gate) * up
            return _SwiGLU.apply(h)
        if self.activation == "geglu":
            gate, up = h.chunk(2, dim=-1)
            return F.gelu(gate) * up
        if self.activation == "gelu":
            return F.gelu(h)
        return F.relu(h)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        h = grouped_linear(x, self.in_proj, counts, self.backend)  # (S, 2F) or (S, F)
        return grouped_linear(self._act(h), self.down_proj, counts, self.backend)  # (S, D)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        h = F.linear(x, self.in_proj[e])
        return F.linear(self._act(h), self.down_proj[e])

    def expert_parameters(self, e: int) -> dict[str, Tensor]:
        """Views of expert e's weights, by the names the edge store and interop use."""
        name = "gate_up_proj" if self.gated else "up_proj"
        return {name: self.in_proj[e], "down_proj": self.down_proj[e]}

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one expert on one token (for equal-compute dense baselines)."""
        up_rows = self.in_proj.shape[1]
        return 2 * self.d_model * up_rows + 2 * self.d_ff * self.d_model

    @torch.no_grad()
    def add_expert(self, init_from: int | None = None) -> int:
        """Append an expert (a copy of ``init_from`` or freshly initialised); returns its index.

        Parameters are replaced, so optimizers must be rebuilt afterwards.
        """
        new_in = torch.empty_like(self.in_proj[:1])
        new_down = torch.empty_like(self.down_proj[:1])
        if init_from is None:
            nn.init.normal_(new_in, std=1.0 / math.sqrt(self.d_model))
            nn.init.normal_(new_down, std=1.0 / math.sqrt(self.d_ff))
        else:
            new_in.copy_(self.in_proj[init_from : init_from + 1])
            new_down.copy_(self.down_proj[init_from : init_from + 1])
        self._set(torch.cat([self.in_proj, new_in]), torch.cat([self.down_proj, new_down]))
        return self.num_experts - 1

    @torch.no_grad()
    def remove_expert(self, e: int) -> None:
        """Drop expert ``e`` (later experts shift down by one). Optimizers must be rebuilt afterwards."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"e must lie in [0, {self.num_experts}), got {e}")
        if self.num_experts == 1:
            raise ValueError("cannot remove the last expert")
        keep = [i for i in range(self.num_experts) if i != e]
        self._set(self.in_proj[keep], self.down_proj[keep])

    def _set(self, in_proj: Tensor, down_proj: Tensor) -> None:
        name = "gate_up_proj" if self.gated else "up_proj"
        setattr(self, name, nn.Parameter(in_proj.contiguous()))
        self.down_proj = nn.Parameter(down_proj.contiguous())
        self.num_experts = in_proj.shape[0]

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
        )
