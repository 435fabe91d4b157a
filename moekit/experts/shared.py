"""Shared experts: always-on FFNs every token passes through (DeepSeekMoE, Qwen2-MoE)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SharedExperts(nn.Module):
    """``num_shared`` always-on SwiGLU experts fused into one FFN of width ``num_shared * d_ff``.

    With ``gate=True`` the output is scaled per token by ``sigmoid(x @ w_gate)`` as in Qwen2-MoE.
    x (T, D) -> (T, D).
    """

    def __init__(self, d_model: int, d_ff: int, num_shared: int = 1, gate: bool = False) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_shared", num_shared)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        width = num_shared * d_ff
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if gate else None
        nn.init.normal_(self.down_proj.weight, std=1.0 / math.sqrt(width))

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(x)) * y
        return y

    def flops_per_token(self) -> int:
        d_model, width = self.gate_proj.in_features, self.gate_proj.out_features
        return 6 * d_model * width
