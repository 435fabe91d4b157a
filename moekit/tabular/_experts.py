"""Expert specs of the tabular MoE: ``"linear"``, ``"mlp"``, hidden widths, or ready ``nn.Module``s.

Every expert maps ``(n, n_features)`` to ``(n, n_outputs)``; specs are turned into modules at fit time, when both
widths are known, and user modules are deep-copied (the estimator's parameters are never changed) and probed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from numbers import Integral

import torch
from torch import Tensor, nn

EXPERT_KINDS = ("linear", "mlp")
ExpertSpec = str | Sequence[int] | nn.Module


def expert_specs(experts: str | Sequence[ExpertSpec], n_experts: int | None) -> list[ExpertSpec]:
    """One spec per expert, from the estimator's ``experts`` and ``n_experts`` parameters (validated)."""
    if n_experts is not None and (isinstance(n_experts, bool) or not isinstance(n_experts, Integral) or n_experts < 1):
        raise ValueError(f"n_experts must be an int >= 1 or None, got {n_experts!r}")
    if isinstance(experts, str):
        if experts not in EXPERT_KINDS:
            raise ValueError(f"experts must be one of {EXPERT_KINDS} or a list of expert specs, got {experts!r}")
        return [experts] * (4 if n_experts is None else int(n_experts))
    if isinstance(experts, nn.Module) or not isinstance(experts, (list, tuple)):
        raise TypeError(
            f"experts must be 'linear', 'mlp' or a list of specs ('linear', 'mlp', hidden widths, nn.Module), "
            f"got {type(experts).__name__}"
        )
    if len(experts) == 0:
        raise ValueError("experts is an empty list: give at least one expert spec ('linear', 'mlp', (64,), ...)")
    if n_experts is not None and n_experts != len(experts):
        raise ValueError(f"n_experts={n_experts} but experts lists {len(experts)} experts; leave n_experts=None")
    return list(experts)


def build_experts(
    specs: list[ExpertSpec], n_in: int, n_out: int, hidden_sizes: Sequence[int], dropout: float
) -> nn.Module:
    """An ``ExpertBank`` when every spec is the same built-in kind, else an ``nn.ModuleList`` of the experts."""
    if not specs:
        raise ValueError("experts is an empty list: give at least one expert spec ('linear', 'mlp', (64,), ...)")
    widths = [_bank_widths(s, i, hidden_sizes) for i, s in enumerate(specs)]
    if widths[0] is not None and all(w == widths[0] for w in widths):
        return ExpertBank(len(specs), n_in, n_out, widths[0], dropout)
    return nn.ModuleList(build_expert(s, i, n_in, n_out, hidden_sizes, dropout) for i, s in enumerate(specs))


def _bank_widths(spec: ExpertSpec, index: int, hidden_sizes: Sequence[int]) -> tuple[int, ...] | None:
    """Hidden widths of a built-in spec (() for linear), or None for a user module."""
    if isinstance(spec, str):
        if spec == "linear":
            return ()
        if spec == "mlp":
            return _widths(hidden_sizes, "hidden_sizes")
        raise ValueError(f"experts[{index}] must be one of {EXPERT_KINDS}, hidden widths or an nn.Module, got {spec!r}")
    if isinstance(spec, (list, tuple)):
        return _widths(spec, f"experts[{index}]")
    if isinstance(spec, nn.Module):
        return None
    raise TypeError(
        f"experts[{index}] must be 'linear', 'mlp', a tuple of hidden widths or an nn.Module, got {type(spec).__name__}"
    )


class ExpertBank(nn.Module):
    """E experts of one architecture (Linear -> ReLU blocks, linear head) as 3-D weights: one batched matmul
    per layer computes every expert on every row. ``forward(x)`` (n, n_in) -> (E, n, n_out)."""

    def __init__(self, n_experts: int, n_in: int, n_out: int, hidden: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.num_experts, self.hidden = n_experts, hidden
        sizes = (n_in, *hidden, n_out)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(n_experts, a, b)) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n_experts, 1, b)) for b in sizes[1:])
        self.dropout = nn.Dropout(dropout) if dropout else None
        # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w, b in zip(self.weights, self.biases, strict=True):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.baddbmm(self.biases[0], x.unsqueeze(0).expand(self.num_experts, -1, -1), self.weights[0])
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = torch.relu(h)
            if self.dropout is not None:
                h = self.dropout(h)
            h = torch.baddbmm(b, h, w)
        return h  # (E, n, n_out)

    @torch.no_grad()
    def zero_output(self) -> None:
        """Zero the last layer: the bank then starts as a zero function (a residual on a shared expert)."""
        self.weights[-1].zero_()
        self.biases[-1].zero_()


def build_expert(
    spec: ExpertSpec, index: int, n_in: int, n_out: int, hidden_sizes: Sequence[int], dropout: float
) -> nn.Module:
    """The module of expert ``index``; raises ValueError naming the expert on a bad spec or width."""
    if isinstance(spec, nn.Module):
        module = copy.deepcopy(spec)
        check_expert_width(module, index, n_in, n_out)
        return module
    if isinstance(spec, str):
        if spec == "linear":
            return nn.Linear(n_in, n_out)
        if spec == "mlp":
            return mlp(n_in, n_out, _widths(hidden_sizes, "hidden_sizes"), dropout)
        raise ValueError(f"experts[{index}] must be one of {EXPERT_KINDS}, hidden widths or an nn.Module, got {spec!r}")
    if isinstance(spec, (list, tuple)):
        return mlp(n_in, n_out, _widths(spec, f"experts[{index}]"), dropout)
    raise TypeError(
        f"experts[{index}] must be 'linear', 'mlp', a tuple of hidden widths or an nn.Module, got {type(spec).__name__}"
    )


def mlp(n_in: int, n_out: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) blocks, then a linear head; no hidden layer is a linear model."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


@torch.no_grad()
def check_expert_width(module: nn.Module, index: int, n_in: int, n_out: int) -> None:
    """Fail before training when a user expert does not map (n, n_in) to (n, n_out)."""
    p = next(module.parameters(), None)
    probe = torch.zeros(2, n_in, dtype=p.dtype if p is not None else torch.float32)
    was_training = module.training
    module.eval()
    try:
        out = module(probe)
    except Exception as err:  # a shape error inside the expert: say which expert and which widths
        raise ValueError(
            f"experts[{index}] must map (n, {n_in}) to (n, {n_out}) (n_features_in_ -> outputs) but fails on "
            f"input of width {n_in}: {err}"
        ) from err
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_out):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"experts[{index}] must map (n, {n_in}) to (n, {n_out}) (n_features_in_ -> outputs), got {got}"
        )


def _widths(widths: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)):
        raise ValueError(f"{name} must be a tuple of positive ints, got {widths!r}")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, Integral) or w < 1:
            raise ValueError(f"{name} must be a tuple of positive ints, got {widths!r}")
    return tuple(int(w) for w in widths)
