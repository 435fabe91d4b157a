"""All-to-all cost of one expert-parallel MoE layer, per rank.

What ``ExpertParallelMoELayer`` sends: a rank with ``T`` tokens routes ``P = T * k`` pairs and keeps ``S = P``
(dropless) or ``S = min(P, E * C / W)`` with ``C = ceil(cf * W * P / E)`` (balanced routing, global
capacity). Each kept pair is one row of ``d_model`` values of ``dtype_bytes`` bytes. Under balanced routing a
share ``(W - 1) / W`` of the rows goes to other ranks, so one all-to-all moves

    bytes_a2a = S * (W - 1) / W * d_model * dtype_bytes        (sent by each rank; as much is received)

and one layer runs four all-to-alls of that size: dispatch and combine in forward, and their transposes in
backward (the gradient of the combine is dispatch-shaped and vice versa). Only kept rows travel (uneven
splits), never capacity padding. Time per all-to-all, every rank sending at once over its own link of
``bandwidth_GBps`` (GB/s per direction) with a per-peer latency ``latency_s``:

    t_a2a = (W - 1) * latency_s + bytes_a2a / (bandwidth_GBps * 1e9)

Control traffic per layer and step is small next to the rows and does not grow with W per rank: an
all-to-all of the E int64 row counts to the experts' owners (with global capacity: all-gathered
``[slots, pairs]`` per rank, then ``k * E`` counts to the owners and as many limits back), and one all-reduce
of ``2E + 2`` float64 values (probability sums, z-loss sum, pairs per expert, tokens) in forward and its
gradient in backward, for the losses over the global batch. ``drop_policy="probability"`` with global
capacity adds 16 bytes per pair to the owners and an 8-byte flag back (not in this model).

``bytes_from_splits`` gives the exact bytes of one all-to-all from the split sizes actually used; the tests
check both formulas against the bytes counted inside ``moekit.parallel.all_to_all``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.dispatch.plan import expert_capacity


@dataclass(frozen=True)
class EPCost:
    """Per-rank all-to-all cost of one MoE layer (see the module doc). Bytes are what one rank sends."""

    tokens: int
    d_model: int
    num_experts: int
    k: int
    ep_size: int
    dtype_bytes: int
    bandwidth_GBps: float
    latency_s: float
    capacity_factor: float | None
    kept_pairs: float  # rows sent per all-to-all (to all ranks, itself included)
    bytes_per_a2a: float  # remote bytes of one all-to-all
    bytes_forward: float  # dispatch + combine
    bytes_backward: float
    bytes_per_layer: float  # forward + backward
    control_bytes: float  # count exchange + aux all-reduce (forward + backward)
    time_per_a2a_s: float
    time_forward_s: float
    time_backward_s: float
    time_per_layer_s: float

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def ep_cost(
    tokens: int,
    d_model: int,
    num_experts: int,
    k: int,
    ep_size: int,
    dtype_bytes: int,
    bandwidth_GBps: float,
    latency_s: float = 0.0,
    capacity_factor: float | None = None,
) -> EPCost:
    """All-to-all bytes and time of one layer for ``tokens`` tokens per rank (balanced routing)."""
    for name, value in (("tokens", tokens), ("d_model", d_model), ("num_experts", num_experts), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size must be an int >= 1 dividing num_experts={num_experts}, got {ep_size!r}")
    if not bandwidth_GBps > 0:
        raise ValueError(f"bandwidth_GBps must be > 0, got {bandwidth_GBps!r}")
    W = ep_size
    pairs = tokens * k
    kept = float(pairs)
    if capacity_factor is not None:
        cap = expert_capacity(pairs * W, num_experts, capacity_factor)  # the layer's own rule
        kept = float(min(pairs, num_experts * cap / W))  # this rank's share of the E * C kept rows
    per_a2a = kept * (W - 1) / W * d_model * dtype_bytes
    if capacity_factor is None:
        counts = num_experts * 8 * (W - 1) / W
    else:
        counts = 16 * (W - 1) + 2 * k * num_experts * 8 * (W - 1) / W
    control = counts + 2 * (2 * num_experts + 2) * 8
    t_a2a = (W - 1) * latency_s + per_a2a / (bandwidth_GBps * 1e9)
    return EPCost(
        tokens=tokens,
        d_model=d_model,
        num_experts=num_experts,
        k=k,
        ep_size=W,
        dtype_bytes=dtype_bytes,
        bandwidth_GBps=bandwidth_GBps,
        latency_s=latency_s,
        capacity_factor=capacity_factor,
        kept_pairs=kept,
        bytes_per_a2a=per_a2a,
        bytes_forward=2 * per_a2a,
        bytes_backward=2 * per_a2a,
        bytes_per_layer=4 * per_a2a,
        control_bytes=float(control),
        time_per_a2a_s=t_a2a,
        time_forward_s=2 * t_a2a,
        time_backward_s=2 * t_a2a,
        time_per_layer_s=4 * t_a2a,
    )


def bytes_from_splits(send_splits: list[int], rank: int, d_model: int, dtype_bytes: int) -> int:
    """Exact remote bytes of one all-to-all: the rows for other ranks times the row size."""
    return (sum(send_splits) - send_splits[rank]) * d_model * dtype_bytes


#: Worked examples for the README: name -> keyword arguments of ``ep_cost`` (without the link).
EXAMPLES: dict[str, dict] = {
    # Switch-Base-128-sized layer: d_model 768, 128 experts, top-1, capacity factor 1.25;
    # 16 ranks with 8192 tokens each (16 sequences of 512).
    "switch_base_128": dict(
        tokens=8192, d_model=768, num_experts=128, k=1, ep_size=16, dtype_bytes=2, capacity_factor=1.25
    ),
    # GShard-600B-sized layer: d_model 1024, 2048 experts (one per rank), top-2, capacity factor 2;
    # 2048 ranks with 2048 tokens each (a 4M-token batch).
    "gshard_600b": dict(
        tokens=2048, d_model=1024, num_experts=2048, k=2, ep_size=2048, dtype_bytes=2, capacity_factor=2.0
    ),
}


def worked_examples(bandwidth_GBps: float = 50.0, latency_s: float = 5e-6) -> dict[str, dict]:
    """``ep_cost`` of every entry of ``EXAMPLES`` over the given link."""
    return {
        name: ep_cost(**kw, bandwidth_GBps=bandwidth_GBps, latency_s=latency_s).as_dict()
        for name, kw in EXAMPLES.items()
    }
