"""Adam(W) training of a ``TabularMoE``: minibatches or full batch, early stopping on a held-out split."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.tabular._network import TabularMoE


@dataclass
class TrainConfig:
    learning_rate: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    n_iter_no_change: int
    tol: float
    balance_weight: float


@dataclass
class TrainResult:
    n_epochs: int
    loss_curve: list[float] = field(default_factory=list)
    validation_curve: list[float] = field(default_factory=list)
    best_loss: float = math.inf


def train(
    net: TabularMoE,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    x_val: Tensor | None,
    y_val: Tensor | None,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> TrainResult:
    """Train in place; with a validation set, stop after ``n_iter_no_change`` epochs without a ``tol`` gain and
    restore the best weights. Without one, stop the same way on the training loss."""
    opt = _adamw(net, cfg)
    n = x.shape[0]
    bs = min(cfg.batch_size, n)
    result = TrainResult(n_epochs=0)
    best_state, stale = None, 0
    if x_val is not None:  # the starting point competes too (a warm-started shared expert may already be best)
        result.best_loss = evaluate(net, loss_fn, x_val, y_val)
        best_state = _snapshot(net)
    for epoch in range(cfg.max_epochs):
        net.train()
        order = torch.randperm(n, generator=generator) if bs < n else None
        total = 0.0
        for start in range(0, n, bs):
            idx = order[start : start + bs] if order is not None else slice(None)
            xb, yb = x[idx], y[idx]
            out, aux = net(xb)
            loss = loss_fn(out, yb)
            full = loss + cfg.balance_weight * aux if cfg.balance_weight else loss
            opt.zero_grad(set_to_none=True)
            full.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
        result.loss_curve.append(total / n)
        result.n_epochs = epoch + 1
        if x_val is not None:
            score = evaluate(net, loss_fn, x_val, y_val)
            result.validation_curve.append(score)
        else:
            score = result.loss_curve[-1]
        if not math.isfinite(score):
            break
        if score < result.best_loss - cfg.tol:
            result.best_loss, stale = score, 0
            best_state = _snapshot(net)
        else:
            stale += 1
            if stale >= cfg.n_iter_no_change:
                break
    if best_state is not None and x_val is not None:
        net.load_state_dict(best_state)
    net.eval()
    return result


def fit_shared(
    net: TabularMoE, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, l2: float, max_iter: int = 100
) -> None:
    """Fit only the shared linear expert by L-BFGS, everything else frozen (eval mode):
    ``loss(net(x), y) + l2 * ||W||^2``, a convex problem (logistic / ridge regression with the experts' output as
    an offset). Used to warm-start it and, after training, to refit it on every row."""
    shared = net.shared
    frozen = [p for p in net.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in shared.parameters():
        p.requires_grad_(True)
    net.eval()
    try:
        with torch.no_grad():  # the experts' part is fixed: compute it once
            offset = net(x)[0] - shared(x)
        opt = torch.optim.LBFGS(shared.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(offset + shared(x), y) + l2 * shared.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _adamw(net: TabularMoE, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where this torch build has it on CPU."""
    try:
        return torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _snapshot(net: TabularMoE) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave torch's setting), then restore it.

    Tabular batches are tiny: one thread avoids waking a thread pool for every op, which is faster and far
    less sensitive to a busy machine.
    """
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@torch.no_grad()
def evaluate(net: TabularMoE, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> float:
    net.eval()
    out, _ = net(x)
    return float(loss_fn(out, y))
