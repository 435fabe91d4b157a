"""Typed, frozen configuration of a training run: the optimiser / loop (`TrainConfig`) and the data
(`DataConfig`). Every field is validated on construction; errors name the field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("fp32", "bf16")


def _int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def _number(owner: str, name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{owner}.{name} must lie in {interval}, got {value!r}")


class _Serialisable:
    """``to_dict`` / ``from_dict`` (unknown keys rejected by name) for the frozen configs below."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # noqa: ANN206
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig(_Serialisable):
    """Optimiser, schedule and loop settings.

    One optimizer step sees ``batch_size * grad_accum`` windows of ``block_size`` tokens. The learning rate
    warms up linearly for ``warmup_steps`` steps, then follows a cosine from ``lr`` to ``lr * min_lr_ratio``
    at ``max_steps``. ``max_seconds`` of wall-clock (steps and evaluations, summed over resumed runs) stops
    the loop early, after the step that crosses it; the schedule still spans ``max_steps``. ``eval_every`` /
    ``checkpoint_every`` = 0: only at the end. ``precision="bf16"`` runs forward passes under bf16 autocast
    (weights and optimizer state stay float32). ``dynmoe_adapt_every`` > 0: every that many steps, MoE layers
    whose router can grow and shrink (``router="dynmoe"``) remove unused experts (keeping at least
    ``dynmoe_min_experts``) and add one where tokens found none (see ``moekit.training.expert_adapt``).
    """

    max_steps: int = 200
    batch_size: int = 16
    block_size: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    precision: str = "fp32"
    seed: int = 0  # data order (and nothing else: the caller seeds model init)
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 1
    checkpoint_every: int = 0
    keep_last: int = 2
    max_seconds: float | None = None
    dynmoe_adapt_every: int = 0  # 0 = never
    dynmoe_min_experts: int = 1

    def __post_init__(self) -> None:
        o = "TrainConfig"
        _int(o, "max_steps", self.max_steps, 1)
        _int(o, "batch_size", self.batch_size, 1)
        _int(o, "block_size", self.block_size, 1)
        _int(o, "grad_accum", self.grad_accum, 1)
        _number(o, "lr", self.lr, 0.0, lo_open=True)
        _number(o, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _int(o, "warmup_steps", self.warmup_steps, 0)
        _number(o, "weight_decay", self.weight_decay, 0.0)
        _number(o, "beta1", self.beta1, 0.0, 1.0)
        _number(o, "beta2", self.beta2, 0.0, 1.0)
        if self.beta1 >= 1.0 or self.beta2 >= 1.0:
            raise ValueError(f"{o}.beta1 and {o}.beta2 must be < 1, got {self.beta1}, {self.beta2}")
        _number(o, "eps", self.eps, 0.0, lo_open=True)
        if self.grad_clip is not None:
            _number(o, "grad_clip", self.grad_clip, 0.0, lo_open=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"{o}.precision must be one of {PRECISIONS}, got {self.precision!r}")
        _int(o, "seed", self.seed, 0)
        _int(o, "eval_every", self.eval_every, 0)
        _int(o, "eval_batches", self.eval_batches, 1)
        _int(o, "log_every", self.log_every, 1)
        _int(o, "checkpoint_every", self.checkpoint_every, 0)
        _int(o, "keep_last", self.keep_last, 1)
        if self.max_seconds is not None:
            _number(o, "max_seconds", self.max_seconds, 0.0, lo_open=True)
        _int(o, "dynmoe_adapt_every", self.dynmoe_adapt_every, 0)
        _int(o, "dynmoe_min_experts", self.dynmoe_min_experts, 1)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum


@dataclass(frozen=True)
class DataConfig(_Serialisable):
    """Where the text comes from and how it is tokenised and split.

    ``source="kjv"`` is the bundled King James Bible; anything else is a path to a UTF-8 text file or folder
    (``lines_per_chapter`` lines form a "chapter"). Every ``val_every``-th chapter is held out for validation.
    ``tokenizer``: a saved ``tokenizer.json`` (or its folder) to reuse; None trains a BPE of ``vocab_size``.
    ``chapter_stride`` > 1 keeps only every n-th chapter (all parts of the corpus, less text: smoke runs).
    """

    source: str = "kjv"
    vocab_size: int = 2048
    val_every: int = 20
    lines_per_chapter: int = 100
    tokenizer: str | None = None
    chapter_stride: int = 1

    def __post_init__(self) -> None:
        o = "DataConfig"
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"{o}.source must be 'kjv' or a path (non-empty string), got {self.source!r}")
        _int(o, "vocab_size", self.vocab_size, 257)
        _int(o, "val_every", self.val_every, 2)
        _int(o, "lines_per_chapter", self.lines_per_chapter, 1)
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ValueError(f"{o}.tokenizer must be a path or None, got {self.tokenizer!r}")
        _int(o, "chapter_stride", self.chapter_stride, 1)
