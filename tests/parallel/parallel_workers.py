"""Rank functions for the expert-parallel tests, run by ``moekit.parallel.spawn.spawn_ranks``.

Every rank builds the same full layer or LM (same seed), so every rank can also compute the single-process
reference on the global batch itself; the functions return max differences, counts and losses as JSON.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from moekit.layer import MoELayer
from moekit.models import LMConfig
from moekit.parallel.all_to_all import comm_stats
from moekit.parallel.cost_model import bytes_from_splits, ep_cost
from moekit.parallel.data_parallel import sync_gradients
from moekit.parallel.ep_layer import ExpertParallelMoELayer
from moekit.parallel.launch import build_model, make_optimizer, train_lm
from moekit.parallel.mesh import (
    ConfigMismatchError,
    DistributedError,
    ParallelGroups,
    build_groups,
    check_consistent,
)
from moekit.routing.base import Router, Routing, fp32_logits, slot_major_pairs

D, F, E, K = 16, 32, 8, 2
LM = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=32, num_experts=4, k=2, max_seq_len=16)
LM_STEPS, LM_BATCH, LM_SEQ, LM_LR = 3, 2, 8, 1e-2

# name -> (capacity_factor, drop_policy, capacity_scope, num_shared_experts, router)
LAYER_CASES = {
    "dropless": (None, "position", "global", 1, "topk"),
    "capacity_position": (1.0, "position", "global", 0, "topk"),
    "capacity_probability": (0.6, "probability", "global", 0, "topk"),
    "capacity_probability_ties": (0.6, "probability", "global", 0, "hash"),  # equal weights: ties everywhere
    "capacity_local": (0.6, "position", "local", 0, "topk"),
}


class RoundRobinRouter(Router):
    """Slot j of token t goes to expert (t + j) % E: perfectly balanced load, for exact byte counts."""

    def __init__(self, d_model: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.weight = torch.nn.Parameter(torch.randn(num_experts, d_model) * 0.1)

    def route(self, x, *, token_ids=None, seq_ids=None) -> Routing:
        T = x.shape[0]
        logits = fp32_logits(x, self.weight)  # (T, E)
        idx = (torch.arange(T).unsqueeze(1) + torch.arange(self.k).unsqueeze(0)) % self.num_experts  # (T, K)
        w = logits.softmax(-1).gather(1, idx)
        token_idx, expert_idx, weight = slot_major_pairs(idx, w)
        return Routing(token_idx, expert_idx, weight, T, self.num_experts, logits=logits, probs=logits.softmax(-1))


def _groups(world: int) -> ParallelGroups:
    return ParallelGroups(ep_size=world, ep_rank=dist.get_rank(), ep_group=dist.group.WORLD)


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _layer(cf, policy, shared, router="topk", router_bias=None) -> MoELayer:
    torch.manual_seed(0)
    options = {"bias": router_bias is not None} if router == "topk" else None
    layer = MoELayer(
        D, F, E, k=K, capacity_factor=cf, drop_policy=policy, num_shared_experts=shared, router=router,
        router_options=options,
    )  # fmt: skip
    if router_bias is not None:
        with torch.no_grad():
            layer.router.bias.copy_(router_bias)
    return layer


def compare_layer(
    rank: int, world: int, cf, policy, scope, shared, router="topk", router_bias=None, empty_rank=None
) -> dict:
    """EP layer vs the single-process layer: outputs, aux loss, input/router/expert/shared grads, drops."""
    full = _layer(cf, policy, shared, router, router_bias)
    ep = ExpertParallelMoELayer(_layer(cf, policy, shared, router, router_bias), capacity_scope=scope)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(world, 2, 6, D, generator=g)
    cs = torch.randn(world, 2, 6, D, generator=g)
    mask = torch.rand(world, 2, 6, generator=g) < 0.8
    ids = torch.randint(0, 50, (world, 2, 6), generator=g)  # token ids (hash routing)
    if empty_rank is not None:
        mask[empty_rank] = False  # that rank routes no token at all
    use_aux = not (scope == "local" and cf is not None)  # per-rank single runs have per-rank aux losses

    comm_stats().reset()
    x = xs[rank].clone().requires_grad_()
    out = ep(x, mask=mask[rank], token_ids=ids[rank])
    loss = (out.output * cs[rank]).sum() * world + (out.aux_loss if use_aux else 0)
    loss.backward()
    sync_gradients(ep, _groups(world))

    X = xs.clone().requires_grad_()
    if use_aux:
        ref = full(X.reshape(world * 2, 6, D), mask=mask.reshape(world * 2, 6), token_ids=ids.reshape(-1, 6))
        Y, ref_aux, ref_dropped = (
            ref.output.reshape(world, 2, 6, D),
            ref.aux_loss,
            ref.stats["dropped_per_expert"],
        )
    else:
        refs = [full(X[r], mask=mask[r], token_ids=ids[r]) for r in range(world)]
        Y, ref_aux = torch.stack([o.output for o in refs]), torch.zeros(())
        ref_dropped = sum(o.stats["dropped_per_expert"] for o in refs)
    ((Y * cs).sum() + ref_aux).backward()

    a, b = ep.expert_start, ep.expert_start + ep.num_local_experts
    res = {
        "out": _max(out.output, Y[rank]),
        "aux": abs(float(out.aux_loss - ref_aux)) if use_aux else 0.0,
        "x_grad": _max(x.grad / world, X.grad[rank]),
        "router_grad": _max(ep.router.weight.grad, full.router.weight.grad) if router == "topk" else 0.0,
        "expert_grad": max(
            _max(ep.experts.gate_up_proj.grad, full.experts.gate_up_proj.grad[a:b]),
            _max(ep.experts.down_proj.grad, full.experts.down_proj.grad[a:b]),
        ),
        "dropped_ep": _sum_over_ranks(out.stats["dropped_per_expert"]).tolist(),
        "dropped_single": ref_dropped.tolist(),
        "local_tokens": int(out.stats["num_tokens"]),
    }
    if shared:
        res["shared_grad"] = _max(ep.shared.up_proj.weight.grad, full.shared.up_proj.weight.grad)
    if cf is None:  # dropless: bytes sent = routed rows for other ranks, straight from the split sizes
        routed = out.stats["tokens_per_expert"].view(world, -1).sum(1).tolist()  # rows per destination
        res["bytes_counted"] = comm_stats().tags["dispatch.fwd"].remote_bytes
        res["bytes_expected"] = bytes_from_splits(routed, rank, D, 4)
    return res


def bytes_balanced(rank: int, world: int) -> dict:
    """Counted all-to-all bytes of a perfectly balanced layer vs the cost model."""
    torch.manual_seed(0)
    router = RoundRobinRouter(D, E, K)
    ep = ExpertParallelMoELayer(MoELayer(D, F, E, k=K, router=router))
    T = 16
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    comm_stats().reset()
    out = ep(x)
    (out.output.square().sum() + out.aux_loss).backward()
    tags = comm_stats().tags
    return {
        "counted": {t: tags[t].remote_bytes for t in ("dispatch.fwd", "combine.fwd", "dispatch.bwd", "combine.bwd")},
        "model": ep_cost(T, D, E, K, world, 4, bandwidth_GBps=1.0).as_dict(),
    }


def failures(rank: int, world: int) -> dict:
    """E not divisible by the EP size, and configs that differ across ranks."""
    res = {}
    try:
        ExpertParallelMoELayer(MoELayer(D, F, world + 1, k=1))
    except ValueError as exc:
        res["indivisible"] = str(exc)
    try:
        check_consistent({"num_experts": 8, "d_model": 16 + rank})
    except ConfigMismatchError as exc:
        res["mismatch"] = str(exc)
    try:  # the layer checks its own configuration across the EP group before splitting the experts
        ExpertParallelMoELayer(MoELayer(D, F, E, k=1 + (rank == world - 1)))
    except ConfigMismatchError as exc:
        res["layer_mismatch"] = str(exc)
    check_consistent({"num_experts": 8})  # same config: passes, and the group is still usable
    res["after"] = float(_sum_over_ranks(torch.ones(1)))
    return res


def layer_suite(rank: int, world: int) -> dict:
    out = {name: compare_layer(rank, world, *case) for name, case in LAYER_CASES.items()}
    # Rank 1 routes no token, and the router sends everything to rank 0's experts: other ranks' experts idle.
    bias = torch.full((E,), -10.0)
    bias[:2] = 10.0
    out["empty_rank"] = compare_layer(rank, world, None, "position", "global", 0, "topk", bias, empty_rank=1)
    out["bytes"] = bytes_balanced(rank, world)
    out["failures"] = failures(rank, world)
    return out


def eval_tokens() -> torch.Tensor:
    return torch.randint(0, LM["vocab_size"], (4, LM_SEQ), generator=torch.Generator().manual_seed(7))


def eval_logits(model, rank: int, world: int) -> list:
    rows = eval_tokens().shape[0] // world
    model.eval()
    with torch.no_grad():
        logits = model(eval_tokens()[rank * rows : (rank + 1) * rows]).logits
    model.train()
    return logits.tolist()


def two_rank_suite(rank: int, world: int, ckpt_dir: str) -> dict:
    """Layer checks, LM training with EP=2 (losses and a checkpoint), failure checks."""
    from moekit.parallel.checkpoint import save_checkpoint

    res = {"layer": layer_suite(rank, world)}
    groups = build_groups(world)
    model = build_model(LMConfig(**LM), groups, seed=0)
    opt = make_optimizer(model, LM_LR)
    res["losses"] = train_lm(model, groups, LM_STEPS, LM_BATCH, LM_SEQ, lr=LM_LR, seed=0, optimizer=opt)
    save_checkpoint(model, ckpt_dir, groups, extra={"config": LM}, optimizer=opt)
    res["logits"] = eval_logits(model, rank, world)
    return res


def four_rank_suite(rank: int, world: int, ckpt_dir: str) -> dict:
    """Layer checks at EP=4, then the EP=2 checkpoint loaded with EP=4, EP=1 x DP=4 and EP=2 x DP=2."""
    from moekit.parallel.checkpoint import load_checkpoint

    res = {"layer": layer_suite(rank, world)}
    for ep in (4, 1, 2):
        groups = build_groups(ep)
        model = build_model(LMConfig(**LM), groups, seed=123)  # other weights, overwritten by the load
        opt = make_optimizer(model, LM_LR)
        load_checkpoint(model, ckpt_dir, optimizer=opt)
        res[f"logits_ep{ep}"] = eval_logits(model, rank, world)
        # two more steps from the loaded AdamW state (same global batches of 2 * LM_BATCH rows); the loss of
        # the second one shows the first update, hence the loaded moments
        rows = 2 * LM_BATCH // world
        res[f"next_ep{ep}"] = train_lm(model, groups, 2, rows, LM_SEQ, LM_LR, 0, start_step=LM_STEPS, optimizer=opt)
    # EP=2 x DP=2 training matches the single process too (expert grads reduced over the DP group).
    groups = build_groups(2)
    model = build_model(LMConfig(**LM), groups, seed=0)
    res["losses_ep2_dp2"] = train_lm(model, groups, LM_STEPS, LM_BATCH // 2, LM_SEQ, lr=LM_LR, seed=0)
    return res


def peer_dies(rank: int, world: int, mode: str) -> dict:
    """One step works; then rank 1 exits ("die") or stalls past the timeout ("stall") before the next step."""
    ep = ExpertParallelMoELayer(_layer(None, "position", 0, "topk"))
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(rank))
    ep(x).output.sum().backward()
    if rank == 1:
        if mode == "die":
            os._exit(0)
        time.sleep(6.0)
        return {"stalled": True}
    start = time.monotonic()
    try:
        ep(x).output.sum().backward()
    except DistributedError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}
