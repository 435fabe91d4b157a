"""Expert-parallel benchmark: one MoE layer, forward+backward, at EP = 1, 2, 4 on local CPU ranks.

Each EP size runs in its own gloo process group (``moekit.parallel.spawn``, 127.0.0.1, one torch thread per
rank). Every rank holds ``tokens`` tokens (weak scaling: the global batch grows with EP) and ``E / EP``
experts. Per EP size: tokens/s of the whole group (global tokens / slowest rank's median step), all-to-all
bytes per rank and step (counted inside the all-to-all wrapper, next to the cost model's balanced-routing
figure), and the share of the step spent inside all-to-all calls. Before timing, every rank checks its
outputs and gradients (input, router, its expert shard after the gradient sync) against the single-process
layer run on the global batch: ``summary.max_abs_diff_vs_single`` (goal <= 1e-5, float32).

A plain ``MoELayer`` on one process is measured too (``single_process`` row): the cost of the EP machinery
at EP=1. On a machine with fewer cores than ranks, the ranks share cores: read EP=4 on 2 cores as a
correctness and overhead run, not as scaling.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console

from moekit.bench.common import environment, print_table, write_result

NAME = "ep"
EP_SIZES = (1, 2, 4)
GOAL_MAX_ABS_DIFF = 1e-5


@dataclass(frozen=True)
class EPCase:
    """One layer shape; ``tokens`` per rank."""

    name: str
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int = 8
    k: int = 2
    warmup: int = 1
    repeats: int = 5


def _cases(mode: str) -> EPCase:
    return {
        "tiny": EPCase("tiny", tokens=64, d_model=32, d_ff=64, warmup=1, repeats=2),
        "quick": EPCase("quick", tokens=1024, d_model=256, d_ff=512, warmup=1, repeats=5),
        "full": EPCase("full", tokens=4096, d_model=512, d_ff=1024, warmup=2, repeats=10),
    }[mode]


def _full_layer(case: EPCase):
    from moekit.layer import MoELayer

    torch.manual_seed(0)
    return MoELayer(case.d_model, case.d_ff, case.num_experts, k=case.k)


def _inputs(case: EPCase, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world, case.tokens, case.d_model, generator=g)
    c = torch.randn(world, case.tokens, case.d_model, generator=g)
    return x, c


def _rank(rank: int, world: int, case_dict: dict) -> dict:
    """One rank: check against the single process, then time forward+backward."""
    import torch.distributed as dist

    from moekit.parallel.all_to_all import comm_stats
    from moekit.parallel.data_parallel import sync_gradients
    from moekit.parallel.ep_layer import ExpertParallelMoELayer
    from moekit.parallel.mesh import ParallelGroups

    case = EPCase(**case_dict)
    groups = ParallelGroups(ep_size=world, ep_rank=rank, ep_group=dist.group.WORLD)
    full = _full_layer(case)
    ep = ExpertParallelMoELayer(_full_layer(case))
    xs, cs = _inputs(case, world)

    # --- correctness: one step against the single-process layer on the global batch. Loss: mean over the
    # tokens of <y, c> plus aux (per rank: the local mean; the gradient sync averages over the ranks).
    x = xs[rank].clone().requires_grad_()
    out = ep(x)
    ((out.output * cs[rank]).sum() / case.tokens + out.aux_loss).backward()
    sync_gradients(ep, groups)
    X = xs.clone().requires_grad_()
    ref = full(X.reshape(-1, case.d_model))
    ((ref.output.view_as(xs) * cs).sum() / (case.tokens * world) + ref.aux_loss).backward()
    a, b = ep.expert_start, ep.expert_start + ep.num_local_experts
    diffs = {
        "output": (out.output - ref.output.view_as(xs)[rank]).abs().max(),
        "aux_loss": (out.aux_loss - ref.aux_loss).abs(),
        "grad_x": (x.grad / world - X.grad[rank]).abs().max(),
        "grad_router": (ep.router.weight.grad - full.router.weight.grad).abs().max(),
        "grad_gate_up_proj": (ep.experts.gate_up_proj.grad - full.experts.gate_up_proj.grad[a:b]).abs().max(),
        "grad_down_proj": (ep.experts.down_proj.grad - full.experts.down_proj.grad[a:b]).abs().max(),
    }
    diffs = {k: float(v.detach()) for k, v in diffs.items()}

    # --- timing: forward + backward of the EP layer (gradient sync not included)
    def step() -> None:
        xi = xs[rank].clone().requires_grad_()
        o = ep(xi)
        ((o.output * cs[rank]).sum() + o.aux_loss).backward()

    for _ in range(case.warmup):
        step()
    ep.zero_grad(set_to_none=True)
    comm_stats().reset()
    times = []
    for _ in range(case.repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    stats = comm_stats()
    a2a = stats.total("dispatch.")
    combine = stats.total("combine.")
    single_ms = None
    if world == 1:  # the plain layer on one process: what EP=1 costs on top

        def plain() -> None:
            xi = xs[0].clone().requires_grad_()
            o = full(xi)
            ((o.output * cs[0]).sum() + o.aux_loss).backward()

        for _ in range(case.warmup):
            plain()
        single = []
        for _ in range(case.repeats):
            start = time.perf_counter()
            plain()
            single.append(time.perf_counter() - start)
        single_ms = statistics.median(single) * 1e3
    return {
        "max_abs_diff": max(diffs.values()),
        "diffs": diffs,
        "median_ms": statistics.median(times) * 1e3,
        "a2a_seconds": (a2a.seconds + combine.seconds) / case.repeats,
        "a2a_remote_bytes": (a2a.remote_bytes + combine.remote_bytes) // case.repeats,
        "control_seconds": (stats.total("ep.").seconds) / case.repeats,
        "single_process_ms": single_ms,
    }


def _bench_ep(case: EPCase, ep_size: int) -> dict[str, Any]:
    from moekit.parallel.cost_model import ep_cost
    from moekit.parallel.spawn import spawn_ranks

    ranks = spawn_ranks(_rank, ep_size, (asdict(case),), timeout_s=600, pg_timeout_s=120)
    step_ms = max(r["median_ms"] for r in ranks)  # the group moves at the pace of its slowest rank
    model = ep_cost(case.tokens, case.d_model, case.num_experts, case.k, ep_size, 4, bandwidth_GBps=1.0)
    a2a_s = statistics.mean(r["a2a_seconds"] for r in ranks)
    return {
        "ep_size": ep_size,
        "global_tokens": case.tokens * ep_size,
        "step_ms": step_ms,
        "tokens_per_s": case.tokens * ep_size / (step_ms / 1e3),
        "a2a_bytes_per_rank": statistics.mean(r["a2a_remote_bytes"] for r in ranks),
        "a2a_bytes_model": model.bytes_per_layer,
        "a2a_share": a2a_s / (step_ms / 1e3),
        "control_share": statistics.mean(r["control_seconds"] for r in ranks) / (step_ms / 1e3),
        "max_abs_diff_vs_single": max(r["max_abs_diff"] for r in ranks),
        "single_process_ms": ranks[0]["single_process_ms"],
        "ranks": ranks,
    }


def run_ep_bench(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    *,
    tiny: bool = False,
    ep_sizes: tuple[int, ...] = EP_SIZES,
    console: Console | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the EP benchmark, print a table, write the JSON result and return it."""
    mode = "tiny" if tiny else "quick" if quick else "full"
    case = _cases(mode)
    console = console or Console()
    console.print(
        f"[bold]ep bench[/] {case.name}: {case.tokens} tokens per rank, d_model={case.d_model}, "
        f"d_ff={case.d_ff}, E={case.num_experts}, k={case.k}, fp32, EP sizes {list(ep_sizes)} ..."
    )
    rows = [_bench_ep(case, ep) for ep in ep_sizes]
    single_ms = next((r["single_process_ms"] for r in rows if r["single_process_ms"] is not None), None)
    cases = []
    if single_ms is not None:
        cases.append({"name": "single_process", "ep_size": 1, "step_ms": single_ms,
                      "tokens_per_s": case.tokens / (single_ms / 1e3)})  # fmt: skip
    cases += [{"name": f"ep{r['ep_size']}", **r} for r in rows]
    max_diff = max(r["max_abs_diff_vs_single"] for r in rows)
    summary = {
        "case": case.name,
        "tokens_per_s": {f"ep{r['ep_size']}": round(r["tokens_per_s"], 1) for r in rows},
        "a2a_bytes_per_rank_step": {f"ep{r['ep_size']}": r["a2a_bytes_per_rank"] for r in rows},
        "a2a_share_of_step": {f"ep{r['ep_size']}": round(r["a2a_share"], 4) for r in rows},
        "single_process_tokens_per_s": None if single_ms is None else round(case.tokens / (single_ms / 1e3), 1),
        "max_abs_diff_vs_single": max_diff,
        "goal_max_abs_diff": GOAL_MAX_ABS_DIFF,
        "goal_met": max_diff <= GOAL_MAX_ABS_DIFF,
    }
    result: dict[str, Any] = {
        "name": NAME,
        "mode": mode,
        "summary": summary,
        "cases": cases,
        "environment": environment(1),
        "config": {**asdict(case), "dtype": "float32", "threads_per_rank": 1, "backend": "gloo"},
    }
    print_table(
        f"ep bench {case.name}: forward+backward of one MoE layer ({case.tokens} tokens per rank)",
        ["run", "step ms", "tokens/s", "a2a bytes/rank", "model bytes", "a2a share", "max |diff|"],
        [
            [
                c["name"],
                c["step_ms"],
                c["tokens_per_s"],
                c.get("a2a_bytes_per_rank"),
                c.get("a2a_bytes_model"),
                c.get("a2a_share"),
                c.get("max_abs_diff_vs_single"),
            ]
            for c in cases
        ],  # fmt: skip
        console,
        caption=f"max |diff| vs the single-process layer: {max_diff:.2e} (goal <= {GOAL_MAX_ABS_DIFF:g})",
    )
    report = write_result(NAME, result, json_path, repo_copy=mode in ("quick", "full"), results_dir=results_dir)
    for path in report.paths:
        console.print(f"wrote {path}")
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    return result
