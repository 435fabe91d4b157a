"""Configuration of the MoE decoder-only language model.

One frozen dataclass, validated on construction (every error names the field), serialisable with
``to_dict`` / ``from_dict`` (unknown keys are rejected by name), and ``dense_baseline()`` for the
equal-active-parameter dense model that MoE results are compared against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moekit.routing.registry import available_routers


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"LMConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"LMConfig.{name} must be >= {minimum}, got {value}")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"LMConfig.{name} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class LMConfig:
    """A decoder-only Transformer with RoPE, RMSNorm, (grouped-query) attention and MoE or SwiGLU FFNs.

    Layer ``i`` (0-based) has an MoE FFN when ``num_experts > 0`` and ``(i + 1) % moe_every == 0``
    (``moe_every=2`` is GLaM's every-other-layer MoE); the other layers have a dense SwiGLU FFN of width
    ``dense_d_ff`` (default ``(k + num_shared_experts) * d_ff``: the expert compute of one token in an MoE
    layer).
    ``num_experts=0`` is a dense model.
    """

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (multi-head attention)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    d_ff: int = 256  # hidden width of each expert (and of each shared expert)
    num_experts: int = 8  # 0 = dense model
    k: int = 2
    moe_every: int = 1
    router: str = "topk"
    router_options: dict = field(default_factory=dict)
    capacity_factor: float | None = None  # None = dropless
    num_shared_experts: int = 0
    shared_gate: bool = False
    dense_d_ff: int | None = None  # width of the dense FFN layers; None = (k + num_shared_experts) * d_ff
    loss_weights: dict | None = None  # MoELayer loss weights; None = moekit.losses.DEFAULT_LOSS_WEIGHTS
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("d_model", self.d_model, 1)
        _check_int("n_layers", self.n_layers, 1)
        _check_int("n_heads", self.n_heads, 1)
        if self.n_kv_heads is not None:
            _check_int("n_kv_heads", self.n_kv_heads, 1)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"LMConfig.n_kv_heads must divide n_heads={self.n_heads}, got {self.n_kv_heads}")
        if self.d_model % self.n_heads:
            raise ValueError(f"LMConfig.d_model must be divisible by n_heads={self.n_heads}, got {self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"LMConfig.d_model / n_heads (the head dim) must be even for RoPE, got "
                f"{self.d_model} / {self.n_heads} = {self.d_model // self.n_heads}"
            )
        _check_int("max_seq_len", self.max_seq_len, 1)
        _check_positive_number("rope_theta", self.rope_theta)
        _check_int("d_ff", self.d_ff, 1)
        _check_int("num_experts", self.num_experts, 0)
        _check_int("k", self.k, 1)
        if self.num_experts and self.k > self.num_experts:
            raise ValueError(f"LMConfig.k must be <= num_experts={self.num_experts}, got {self.k}")
        _check_int("moe_every", self.moe_every, 1)
        if self.num_experts and self.moe_every > self.n_layers:
            raise ValueError(
                f"LMConfig.moe_every must be <= n_layers={self.n_layers} (else no layer is MoE), got {self.moe_every}"
            )
        if not isinstance(self.router, str) or self.router not in available_routers():
            raise ValueError(f"LMConfig.router must be one of {available_routers()}, got {self.router!r}")
        if not isinstance(self.router_options, dict):
            raise ValueError(f"LMConfig.router_options must be a dict, got {self.router_options!r}")
        if self.capacity_factor is not None:
            _check_positive_number("capacity_factor", self.capacity_factor)
        _check_int("num_shared_experts", self.num_shared_experts, 0)
        if not isinstance(self.shared_gate, bool):
            raise ValueError(f"LMConfig.shared_gate must be a bool, got {self.shared_gate!r}")
        if self.dense_d_ff is not None:
            _check_int("dense_d_ff", self.dense_d_ff, 1)
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, dict):
                raise ValueError(f"LMConfig.loss_weights must be a dict or None, got {self.loss_weights!r}")
            for name, weight in self.loss_weights.items():
                if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                    raise ValueError(f"LMConfig.loss_weights must map names to numbers, got {name!r}: {weight!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LMConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        _check_positive_number("norm_eps", self.norm_eps)
        # Private copies, so that mutating the caller's dicts cannot change a frozen config.
        object.__setattr__(self, "router_options", dict(self.router_options))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", dict(self.loss_weights))

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads``, or ``n_heads`` when it is None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense SwiGLU FFN layers."""
        if self.dense_d_ff is not None:
            return self.dense_d_ff
        return (self.k + self.num_shared_experts) * self.d_ff

    def is_moe_layer(self, i: int) -> bool:
        """True when layer ``i`` (0-based) has an MoE FFN."""
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0

    # ------------------------------------------------------------------ baselines and serialisation
    def dense_baseline(self) -> LMConfig:
        """The dense model with the same active parameters per token.

        Every FFN becomes a dense SwiGLU of width ``(k + num_shared_experts) * d_ff``, i.e. exactly the
        expert weights one token uses in an MoE layer. The router weights (``num_experts * d_model`` per MoE
        layer, plus ``d_model`` for a shared-expert gate) have no dense counterpart, so the MoE model has that
        many more active parameters: ``E / (3 (k + S) d_ff)`` of its active FFN parameters (<1% usually).
        """
        width = (self.k + self.num_shared_experts) * self.d_ff
        has_dense_layers = self.num_experts == 0 or self.moe_every > 1
        if self.dense_d_ff is not None and self.dense_d_ff != width and has_dense_layers:
            raise ValueError(
                f"LMConfig.dense_d_ff={self.dense_d_ff} differs from the MoE layers' active width "
                f"(k + num_shared_experts) * d_ff = {width}, so no single dense width matches the active "
                "parameters"
            )
        return dataclasses.replace(self, num_experts=0, dense_d_ff=width)

    def to_dict(self) -> dict[str, Any]:
        """A plain (JSON-able) dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Inverse of ``to_dict``; unknown keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"LMConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LMConfig.from_dict: unknown keys {unknown}")
        if "vocab_size" not in d:
            raise ValueError("LMConfig.from_dict: missing required key 'vocab_size'")
        return cls(**d)
