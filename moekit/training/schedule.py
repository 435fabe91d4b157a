"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math

from moekit.training.config import TrainConfig


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Steps ``0 .. warmup-1`` ramp linearly up to ``lr`` (step 0 gets ``lr / warmup``); then a cosine from
    ``lr`` at ``warmup`` to ``lr * min_lr_ratio`` at ``max_steps`` (held there beyond).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    warmup = config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(config.max_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
