"""Heterogeneous experts: any ``nn.Module``s mapping (n, D) -> (n, D), e.g. a GRU next to an FFN."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ExpertList(nn.Module):
    """Experts of different kinds behind the grouped-expert interface.

    ``forward(x, counts)``: x (S, D) sorted by expert, counts (E,) -> (S, D); each expert sees its rows only.
    """

    def __init__(self, experts: list[nn.Module] | nn.ModuleList, d_model: int) -> None:
        super().__init__()
        if not isinstance(experts, (list, tuple, nn.ModuleList)):
            raise TypeError(f"experts must be a list of nn.Module, got {type(experts).__name__}")
        if len(experts) == 0:
            raise ValueError("experts must hold at least one nn.Module, got an empty list")
        for i, e in enumerate(experts):
            if not isinstance(e, nn.Module):
                raise TypeError(f"experts[{i}] must be an nn.Module, got {type(e).__name__}")
        self.experts = nn.ModuleList(experts)
        self.d_model = d_model
        self.num_experts = len(experts)
        self._check_widths()

    @torch.no_grad()
    def _check_widths(self) -> None:
        """Fail at construction, not mid-training, when an expert does not map d_model to d_model."""
        p = next(self.parameters(), None)
        probe = torch.zeros(2, self.d_model, dtype=p.dtype if p is not None else torch.float32)
        for i, e in enumerate(self.experts):
            was_training = e.training
            e.eval()
            try:
                out = e(probe)
            except Exception as err:  # a shape error inside the expert: say which expert
                raise ValueError(f"experts[{i}] does not accept input of width d_model={self.d_model}: {err}") from err
            finally:
                e.train(was_training)
            if not isinstance(out, Tensor) or out.shape != probe.shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"experts[{i}] must map (n, {self.d_model}) to (n, {self.d_model}), got {got}")

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                outs.append(self.experts[e](x[start : start + n]))
                start += n
        if not outs:
            return x[:0] * 0  # (0, D), kept in the autograd graph of x so that backward still runs
        return torch.cat(outs, dim=0)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        return self.experts[e](x)


class FFNExpert(nn.Module):
    """One SwiGLU FFN expert, (n, D) -> (n, D)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class GRUExpert(nn.Module):
    """A GRU expert for sequential input packed into the token vector.

    Each row of width ``d_model = steps * step_width`` is read as ``steps`` vectors of ``step_width`` (e.g. word
    embeddings of a short text); the GRU's last hidden state is projected back to ``d_model``. Rows stay
    independent, so the expert behaves per token like any other. (n, D) -> (n, D).
    """

    def __init__(self, d_model: int, steps: int, hidden: int) -> None:
        super().__init__()
        if d_model % steps:
            raise ValueError(f"steps must divide d_model ({d_model}), got {steps}")
        self.steps, self.step_width = steps, d_model // steps
        self.gru = nn.GRU(self.step_width, hidden, batch_first=True)
        self.out = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.reshape(x.shape[0], self.steps, self.step_width)  # (n, steps, step_width)
        _, h = self.gru(seq)  # h (1, n, hidden)
        return self.out(h[0])
