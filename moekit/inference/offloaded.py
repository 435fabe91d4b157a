"""``OffloadedExperts``: a drop-in for ``GroupedFFN`` whose experts live in an ``ExpertCache`` over a store.

Swap it into ``MoELayer.experts``: ``forward(x_sorted, counts)`` and ``expert_forward(e, x)`` compute exactly
what ``GroupedFFN`` computes (the same ``F.linear`` per expert), fetching each expert through the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

from moekit.inference.quantize import dequantize_expert
from moekit.inference.store import LayerInfo

if TYPE_CHECKING:
    from moekit.inference.runtime import ExpertRuntime


def activate(h: Tensor, activation: str) -> Tensor:
    """The expert activation, as ``GroupedFFN`` applies it: h (n, 2F) gated or (n, F)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    return F.relu(h)


class OffloadedExperts(nn.Module):
    """The experts of MoE layer ``layer``, loaded on demand (no parameters of its own).

    ``forward(x, counts)``: x (S, D) rows sorted by expert, counts (E,) -> (S, D).
    ``expert_forward(e, x)``: x (n, D) -> (n, D) through expert e alone.
    """

    def __init__(self, layer: int, info: LayerInfo, runtime: ExpertRuntime) -> None:
        super().__init__()
        self.layer = layer
        self.d_model, self.d_ff, self.num_experts = info.d_model, info.d_ff, info.num_experts
        self.activation = info.activation
        self.gated = info.activation in ("swiglu", "geglu")
        self._in_name = "gate_up_proj" if self.gated else "up_proj"
        self._runtime = runtime

    def _weights(self, value: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self._runtime.quantized:
            value = dequantize_expert(value)
        return value[self._in_name], value["down_proj"]

    def _compute(self, value: Any, x: Tensor) -> Tensor:
        w_in, w_down = self._weights(value)  # (2F, D), (D, F)
        return F.linear(activate(F.linear(x, w_in), self.activation), w_down)  # (n, D)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        counts_list = [int(c) for c in counts.tolist()]
        if len(counts_list) != self.num_experts:
            raise ValueError(
                f"counts has {len(counts_list)} entries, layer {self.layer} has {self.num_experts} experts"
            )
        starts, total = [], 0
        for c in counts_list:
            starts.append(total)
            total += c
        if total != x.shape[0]:
            raise ValueError(f"counts sum to {total} but x has {x.shape[0]} rows")
        y = x.new_empty(x.shape[0], self.d_model)  # (S, D)
        experts = tuple(e for e, c in enumerate(counts_list) if c)
        if not experts:
            return y

        def compute(e: int, value: Any) -> None:
            rows = slice(starts[e], starts[e] + counts_list[e])
            y[rows] = self._compute(value, x[rows])

        self._runtime.run_call(self.layer, experts, x, compute)
        return y

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        if not 0 <= e < self.num_experts:
            raise ValueError(f"e must lie in [0, {self.num_experts}), got {e}")
        out: list[Tensor] = []
        self._runtime.run_call(self.layer, (e,), x, lambda _e, value: out.append(self._compute(value, x)))
        return out[0]

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer}, d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, offloaded"
        )
