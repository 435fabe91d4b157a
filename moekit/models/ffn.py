"""Dense SwiGLU feed-forward network (Shazeer, 2020), the FFN of the non-MoE layers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with hidden width ``d_ff``. x (..., D) -> (..., D).

    The same function as one SwiGLU expert of ``moekit.experts.GroupedFFN``, so a dense layer of width
    ``k * d_ff`` has exactly the weights one token uses in an MoE layer with top-k experts of width ``d_ff``.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal init: ``std`` for the input projections, ``out_std`` for the residual output projection."""
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)
