"""Layer benchmark: forward+backward of one MoE layer, side by side with what people would use instead.

Candidates, all on the same input and (except dense) the very same weight tensors:

- ``dense``: a SwiGLU FFN of width ``k * d_ff`` (the same active FLOPs per token; the speed to aim for);
- ``naive_loop``: the per-expert Python loop people write first (mask each expert's
  tokens, compute, index_add);
- ``moekit/<backend>``: ``MoELayer`` with each grouped-GEMM backend (``grouped_mm``, ``bmm``, ``loop``);
- ``hf_mixtral/<impl>``, ``hf_qwen3/<impl>``: Hugging Face's ``MixtralSparseMoeBlock`` and
  ``Qwen3MoeSparseMoeBlock`` under each ``experts_implementation`` registered in transformers.

Before timing, every MoE candidate's output is checked against ``naive_loop`` (on the tokens where both pick
the same experts: HF computes router logits in the input dtype, moekit in float32) and the bench raises
``AssertionError`` when one disagrees beyond the dtype's tolerance.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from torch import Tensor, nn

from moekit.bench.common import (
    Measurement,
    TimingConfig,
    environment,
    num_threads,
    print_table,
    profile_callable,
    time_interleaved,
    write_result,
)
from moekit.dispatch.backends import BACKENDS, resolve_backend
from moekit.layer import MoELayer
from moekit.models.ffn import SwiGLU

NAME = "layer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: Routers whose math the naive loop and the HF blocks reproduce (softmax, top-k, renormalise).
ROUTERS = ("topk", "mixtral")
#: Headline goals: moekit best backend vs dense, vs the best HF implementation, vs the naive loop.
GOALS = {"time_vs_dense": ("<=", 1.15), "speedup_vs_hf_best": (">=", 1.0), "speedup_vs_loop": (">=", 2.0)}


@dataclass(frozen=True)
class LayerCase:
    """One benchmark shape: ``tokens`` x ``d_model`` input, E experts of width ``d_ff``, top-``k``."""

    tokens: int = 4096
    d_model: int = 512
    d_ff: int = 1024
    num_experts: int = 64
    k: int = 2
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"need 1 <= k <= num_experts, got k={self.k}, num_experts={self.num_experts}")

    @property
    def name(self) -> str:
        return f"E{self.num_experts}-k{self.k}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def step_flops(self) -> int:
        """Expert FLOPs of one forward+backward (backward = 2x forward); the dense baseline does the same."""
        forward = self.tokens * self.k * 2 * 3 * self.d_model * self.d_ff  # gate, up, down projections
        return 3 * forward

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


HEADLINE = LayerCase()
#: The quick run's headline: E=64, k=2, fp32 and 128 pairs per expert as in the full run, at half the widths, so
#: that every candidate (the per-expert loops too, whose cost grows with E x weight size) fits in about a minute.
QUICK_HEADLINE = replace(HEADLINE, d_model=256, d_ff=512)
#: HF experts implementations the quick run times ("eager" is a per-expert loop like ``naive_loop``, minutes per
#: step at the full size; the full run times it).
QUICK_HF_IMPLS = ("grouped_mm", "batched_mm")
#: Quick timing: 1 warmup + 2 timed calls in CPU time of one thread, so that a shared, loaded machine (where
#: wall-clock medians swing 3x) still gives stable ratios; the full run measures wall-clock time.
QUICK_TIMING = TimingConfig(warmup=1, repeats=2, threads=1, clock="cpu")


def full_cases() -> list[LayerCase]:
    """tokens 4096, d_model 512, d_ff 1024; E in {8, 64}, k in {2, 8}, fp32 and bf16; the headline first."""
    grid = [
        LayerCase(num_experts=e, k=k, dtype=dt) for dt, e, k in itertools.product(("fp32", "bf16"), (64, 8), (2, 8))
    ]
    return [HEADLINE] + [case for case in grid if case != HEADLINE]


def quick_cases() -> list[LayerCase]:
    """Just the headline case (E=64, k=2, fp32, 4096 tokens) at d_model 256, d_ff 512 (see ``QUICK_HEADLINE``)."""
    return [QUICK_HEADLINE]


def tiny_cases() -> list[LayerCase]:
    """Test-sized shapes (milliseconds): structure of the results, not speed."""
    small = LayerCase(tokens=64, d_model=32, d_ff=64, num_experts=8, k=2)
    return [small, replace(small, num_experts=4, dtype="bf16")]


@dataclass(frozen=True)
class LayerBenchConfig:
    """What to compare and how.

    Args:
        router: moekit router, ``"topk"`` or ``"mixtral"`` (same math as the naive loop and the HF blocks).
        backends: moekit grouped-GEMM backends to time.
        hf: include the Hugging Face blocks (skipped with a note when transformers is missing).
        timing: warmup/repeats/threads/clock (None: by mode; quick ``QUICK_TIMING``, full 1+3, tiny 1+2).
        slow_repeats: timed calls (no warmup) of the per-expert Python loops (``naive_loop``, HF ``eager``),
            which take 10-50x longer than the rest; their first call is already steady (seconds long).
        hf_impls: HF ``experts_implementation`` values to time (None: ``"eager"`` and all registered ones).
        seed: weights and inputs.
        gather_limit_gib: skip a candidate whose per-pair weight gather (HF ``batched_mm``) would
            need more memory.
        rtol: allowed max |diff| / max |reference| per dtype name.
    """

    router: str = "topk"
    backends: tuple[str, ...] = BACKENDS
    hf: bool = True
    timing: TimingConfig | None = None
    slow_repeats: int = 1
    hf_impls: tuple[str, ...] | None = None
    seed: int = 0
    gather_limit_gib: float = 2.0
    rtol: tuple[tuple[str, float], ...] = (("fp32", 1e-3), ("bf16", 5e-2))

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS} (the routing the baselines share), got {self.router!r}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"backends must be a non-empty subset of {BACKENDS}, got {self.backends!r}")
        if isinstance(self.slow_repeats, bool) or not isinstance(self.slow_repeats, int) or self.slow_repeats < 1:
            raise ValueError(f"slow_repeats must be an int >= 1, got {self.slow_repeats!r}")


# ---------------------------------------------------------------------------------------------- candidates
class NaiveLoopMoE(nn.Module):
    """The MoE layer as users first write it: route, then per expert mask its tokens, compute, index_add."""

    def __init__(self, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor, k: int) -> None:
        super().__init__()
        self.router_weight, self.gate_up_proj, self.down_proj, self.k = (
            router_weight,
            gate_up_proj,
            down_proj,
            k,
        )

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(T, k) combine weights (float32) and expert indices: softmax, top-k, renormalise."""
        probs = F.linear(x.float(), self.router_weight.float()).softmax(dim=-1)
        weights, experts = probs.topk(self.k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: Tensor) -> Tensor:
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(experts == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        return out


@dataclass(frozen=True)
class Candidate:
    """One implementation: ``forward`` (T, D) -> (T, D); ``choice`` (T, D) -> (T, k) sorted expert indices."""

    name: str
    kind: str  # "dense", "naive", "moekit", "hf"
    forward: Callable[[Tensor], Tensor]
    choice: Callable[[Tensor], Tensor] | None = None
    note: str = ""
    slow: bool = False  # a per-expert Python loop: timed ``slow_repeats`` times, without warmup


@dataclass
class _Built:
    candidates: list[Candidate]
    skipped: dict[str, str]
    params: list[Tensor]
    reference: NaiveLoopMoE


def _moekit_choice(layer: MoELayer, k: int) -> Callable[[Tensor], Tensor]:
    def choice(x: Tensor) -> Tensor:
        routing = layer.router(x)
        return routing.expert_idx.view(k, -1).t().sort(dim=-1).values  # slot-major pairs -> (T, k)

    return choice


def _build(case: LayerCase, cfg: LayerBenchConfig, x: Tensor) -> _Built:
    """All candidates for one case; the MoE ones share one set of parameters."""
    D, Fw, E, k, dtype = case.d_model, case.d_ff, case.num_experts, case.k, case.torch_dtype
    torch.manual_seed(cfg.seed)
    base = MoELayer(D, Fw, E, k, router=cfg.router, backend=cfg.backends[0]).to(dtype)
    router_w, gate_up, down = base.router.weight, base.experts.gate_up_proj, base.experts.down_proj
    dense = SwiGLU(D, k * Fw)
    dense.reset_parameters(std=1.0 / math.sqrt(D), out_std=1.0 / math.sqrt(k * Fw))
    dense = dense.to(dtype)
    naive = NaiveLoopMoE(router_w, gate_up, down, k)
    candidates = [
        Candidate("dense", "dense", dense, note=f"SwiGLU width k*d_ff={k * Fw}"),
        Candidate("naive_loop", "naive", naive, lambda t: naive.route(t)[1].sort(dim=-1).values, slow=True),
    ]
    skipped: dict[str, str] = {}
    for backend in cfg.backends:
        layer = base if backend == cfg.backends[0] else MoELayer(D, Fw, E, k, router=cfg.router, backend=backend)
        if layer is not base:  # share the very same tensors (no copy, same gradients)
            layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj = router_w, gate_up, down
        ran_as = resolve_backend(backend, x, gate_up)
        note = f"ran as {ran_as} (grouped_mm unavailable here)" if ran_as != backend else ""
        fwd = (lambda m: lambda t: m(t).output)(layer)
        candidates.append(Candidate(f"moekit/{backend}", "moekit", fwd, _moekit_choice(layer, k), note))
    if cfg.hf:
        hf, hf_skipped = _hf_candidates(case, cfg, router_w, gate_up, down)
        candidates += hf
        skipped.update(hf_skipped)
    params = [router_w, gate_up, down, *dense.parameters()]
    return _Built(candidates, skipped, params, naive)


def _hf_candidates(
    case: LayerCase, cfg: LayerBenchConfig, router_w: Tensor, gate_up: Tensor, down: Tensor
) -> tuple[list[Candidate], dict[str, str]]:
    """Mixtral and Qwen3-MoE blocks holding our tensors, one candidate per ``experts_implementation``."""
    try:
        from transformers import MixtralConfig, Qwen3MoeConfig
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError as exc:
        return [], {"hf": f"transformers not importable: {exc}"}
    D, Fw, E, k = case.d_model, case.d_ff, case.num_experts, case.k
    sizes = dict(hidden_size=D, num_experts_per_tok=k, hidden_act="silu")
    blocks = {
        "hf_mixtral": MixtralSparseMoeBlock(
            MixtralConfig(intermediate_size=Fw, num_local_experts=E, router_jitter_noise=0.0, **sizes)
        ),
        "hf_qwen3": Qwen3MoeSparseMoeBlock(
            Qwen3MoeConfig(moe_intermediate_size=Fw, num_experts=E, norm_topk_prob=True, **sizes)
        ),
    }
    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    impls = ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    if cfg.hf_impls is not None:
        for impl in impls:
            if impl not in cfg.hf_impls:
                for prefix in blocks:
                    skipped[f"{prefix}/{impl}"] = "not timed in this mode (hf_impls); the full run times it"
        impls = [impl for impl in impls if impl in cfg.hf_impls]
    gather_gib = case.tokens * k * 3 * D * Fw * gate_up.element_size() / 2**30
    for prefix, block in blocks.items():
        block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj = router_w, gate_up, down
        block.train()
        choice = (lambda b: lambda t: b.gate(t)[2].sort(dim=-1).values)(block)
        for impl in impls:
            name = f"{prefix}/{impl}"
            if impl == "batched_mm" and gather_gib > cfg.gather_limit_gib:
                skipped[name] = (
                    f"gathers one weight matrix per token-expert pair: ~{gather_gib:.1f} GiB "
                    f"> gather_limit_gib={cfg.gather_limit_gib:g}"
                )
                continue
            candidates.append(Candidate(name, "hf", _hf_forward(block, impl), choice, slow=impl == "eager"))
    return candidates, skipped


def _hf_forward(block: nn.Module, impl: str) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        block.experts.config._experts_implementation = impl  # read at every experts call
        return block(x.unsqueeze(0)).squeeze(0)

    return forward


# ---------------------------------------------------------------------------------------------- checks
def check_agreement(
    candidates: Sequence[Candidate], reference: NaiveLoopMoE, x: Tensor, rtol: float
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Max |diff| of each MoE candidate vs the naive loop, on the tokens where both choose the same experts.

    Returns (per-candidate diffs, failures: name -> error of candidates whose forward raised). Raises
    ``AssertionError`` when a candidate disagrees beyond ``rtol`` (relative to max |reference|).
    """
    diffs: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    with torch.no_grad():
        ref = reference(x).float()
        ref_choice = reference.route(x)[1].sort(dim=-1).values
        scale = max(float(ref.abs().max()), 1e-12)
        for cand in candidates:
            if cand.kind == "dense":
                continue
            try:
                out = cand.forward(x).float()
                same = (cand.choice(x) == ref_choice).all(dim=-1) if cand.choice else torch.ones_like(ref[:, 0])
            except Exception as exc:  # a candidate that cannot run here is skipped, with why
                failed[cand.name] = f"{type(exc).__name__}: {exc}".strip()[:500]
                continue
            same = same.bool()
            diff = float((out - ref).abs()[same].max()) if bool(same.any()) else math.nan
            diffs[cand.name] = {
                "max_abs_diff": diff,
                "rel_diff": diff / scale,
                "routing_mismatch_share": 1.0 - float(same.float().mean()),
            }
    bad = {n: d for n, d in diffs.items() if not d["rel_diff"] <= rtol or d["routing_mismatch_share"] > 0.5}
    if bad:
        raise AssertionError(f"outputs disagree with the naive loop (rtol={rtol:g}, scale={scale:.3g}): {bad}")
    return diffs, failed


# ---------------------------------------------------------------------------------------------- one case
def bench_case(
    case: LayerCase,
    cfg: LayerBenchConfig,
    timing: TimingConfig,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Check agreement, then time forward+backward of every candidate, interleaved."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(case.tokens, case.d_model, generator=gen).to(case.torch_dtype).requires_grad_(True)
    grad = torch.randn(case.tokens, case.d_model, generator=gen).to(case.torch_dtype)
    built = _build(case, cfg, x)
    rtol = dict(cfg.rtol)[case.dtype]
    diffs, failed = check_agreement(built.candidates, built.reference, x.detach(), rtol)
    runnable = [c for c in built.candidates if c.name not in failed]

    def step(forward: Callable[[Tensor], Tensor]) -> Callable[[], None]:
        def run() -> None:
            for p in built.params:
                p.grad = None
            x.grad = None
            forward(x).backward(grad)

        return run

    if progress is not None:
        progress(f"outputs agree; timing {len(runnable)} candidates")
    fast = {c.name: step(c.forward) for c in runnable if not c.slow}
    measured = time_interleaved(fast, timing, on_error=(Exception,), progress=progress)
    slow = {c.name: step(c.forward) for c in runnable if c.slow}
    if slow:
        if progress is not None:
            progress(f"timing the per-expert loops {sorted(slow)} ({cfg.slow_repeats} call each)")
        slow_timing = replace(timing, warmup=0, repeats=cfg.slow_repeats)
        slow_measured = time_interleaved(slow, slow_timing, on_error=(Exception,))
        measured = Measurement({**measured.timings, **slow_measured.timings}, measured.failed)
        failed.update(slow_measured.failed)
    failed.update(measured.failed)
    dense_ms = measured.timings["dense"].median_ms if "dense" in measured.timings else math.nan
    rows = []
    for cand in runnable:
        if cand.name not in measured.timings:
            continue
        t = measured.timings[cand.name]
        rows.append(
            {
                "name": cand.name,
                "kind": cand.kind,
                **t.to_dict(),
                "ratio_vs_dense": round(t.median_ms / dense_ms, 4),
                **{k: _round(v) for k, v in diffs.get(cand.name, {}).items()},
                "note": cand.note,
            }
        )
    return {
        "case": case.to_dict(),
        "step_gflop": round(case.step_flops() / 1e9, 3),
        "candidates": rows,
        "skipped": {**built.skipped, **failed},
        "rtol": rtol,
        "clock": timing.clock,
    }


def _round(v: float) -> float | None:
    return None if math.isnan(v) else float(f"{v:.4g}")


# ---------------------------------------------------------------------------------------------- summary
def summarize(case_result: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of one case: moekit best backend vs dense, vs HF best, vs the naive loop."""
    rows = {r["name"]: r for r in case_result["candidates"]}

    def best(kind: str) -> dict[str, Any] | None:
        of_kind = [r for r in rows.values() if r["kind"] == kind]
        return min(of_kind, key=lambda r: r["median_ms"]) if of_kind else None

    moe, hf = best("moekit"), best("hf")
    dense, naive = rows.get("dense"), rows.get("naive_loop")

    def ratio(num: dict | None, den: dict | None) -> float | None:
        return round(num["median_ms"] / den["median_ms"], 3) if num and den else None

    values = {
        "time_vs_dense": ratio(moe, dense),
        "speedup_vs_hf_best": ratio(hf, moe),
        "speedup_vs_loop": ratio(naive, moe),
    }
    goals = {}
    for key, (op, target) in GOALS.items():
        v = values[key]
        met = None if v is None else (v <= target if op == "<=" else v >= target)
        goals[key] = {"target": f"{op} {target:g}", "value": v, "met": met}
    diffs = [r["max_abs_diff"] for r in rows.values() if r.get("max_abs_diff") is not None]
    return {
        "case": case_result["case"]["name"],
        "shape": {key: case_result["case"][key] for key in ("tokens", "d_model", "d_ff")},
        **values,
        "best_backend": moe["name"].split("/", 1)[1] if moe else None,
        "moekit_ms": moe["median_ms"] if moe else None,
        "dense_ms": dense["median_ms"] if dense else None,
        "naive_loop_ms": naive["median_ms"] if naive else None,
        "hf_best": hf["name"] if hf else None,
        "hf_best_ms": hf["median_ms"] if hf else None,
        "goals": goals,
        "outputs_agree": True,  # bench_case raises otherwise
        "max_abs_diff": max(diffs) if diffs else None,
    }


# ---------------------------------------------------------------------------------------------- profile
def profile_moekit(
    case: LayerCase, backend: str = "grouped_mm", router: str = "topk", row_limit: int = 15, seed: int = 0
) -> list[dict[str, Any]]:
    """Where one ``MoELayer`` forward+backward spends CPU time: top ops by self time (torch.profiler)."""
    torch.manual_seed(seed)
    layer = MoELayer(case.d_model, case.d_ff, case.num_experts, case.k, router=router, backend=backend)
    layer = layer.to(case.torch_dtype)
    x = torch.randn(case.tokens, case.d_model, dtype=case.torch_dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).output.backward(grad)

    return profile_callable(step, row_limit=row_limit)


# ---------------------------------------------------------------------------------------------- entry point
def run_layer_bench(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    tiny: bool = False,
    cases: Sequence[LayerCase] | None = None,
    config: LayerBenchConfig | None = None,
    profile: bool = False,
    console: Console | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the layer benchmark, print a table per case, write the JSON result and return it.

    Cases: ``cases`` if given, else ``tiny_cases()`` (tests), ``quick_cases()`` or ``full_cases()``; the first
    is the headline of ``summary``. A tiny or custom-case run is not copied to ``benchmarks/results``.
    """
    cfg = config or LayerBenchConfig()
    mode = "tiny" if tiny else "custom" if cases is not None else "quick" if quick else "full"
    by_mode = {"tiny": tiny_cases, "quick": quick_cases, "full": full_cases}
    chosen = list(cases) if cases is not None else by_mode[mode]()
    if not chosen:
        raise ValueError("no cases to run")
    if config is None and mode == "quick":
        cfg = replace(cfg, hf_impls=QUICK_HF_IMPLS)
    timing = cfg.timing or {"tiny": TimingConfig(1, 2), "quick": QUICK_TIMING}.get(mode, TimingConfig(1, 3))
    if threads is not None:
        # CPU time counts every thread's spinning too: it is only the measure for one thread.
        timing = replace(timing, threads=threads, clock=timing.clock if threads == 1 else "wall")
    console = console or Console()
    results = []
    with num_threads(timing.threads) as used_threads:
        for case in chosen:
            console.print(
                f"[bold]layer bench[/] {case.name}: tokens={case.tokens} d_model={case.d_model} "
                f"d_ff={case.d_ff} ({case.step_flops() / 1e9:.1f} GFLOP per fwd+bwd) ..."
            )
            res = bench_case(case, cfg, timing, progress=lambda msg: console.print(f"[dim]  {msg}[/]"))
            results.append(res)
            _print_case(res, console)
        result: dict[str, Any] = {
            "name": NAME,
            "mode": mode,
            "summary": summarize(results[0]),
            "cases": results,
            "environment": environment(used_threads),
            "config": {
                "router": cfg.router,
                "backends": list(cfg.backends),
                "seed": cfg.seed,
                "warmup": timing.warmup,
                "repeats": timing.repeats,
                "clock": timing.clock,
                "slow_repeats": cfg.slow_repeats,
                "hf": cfg.hf,
                "hf_impls": None if cfg.hf_impls is None else list(cfg.hf_impls),
            },
        }
        if profile:
            best = result["summary"]["best_backend"] or cfg.backends[0]
            result["profile"] = {
                "case": chosen[0].name,
                "backend": best,
                "ops": profile_moekit(chosen[0], best, cfg.router, seed=cfg.seed),
            }
            print_table(
                f"moekit/{best} fwd+bwd, {chosen[0].name}: CPU self time by op",
                ["op", "self ms", "share", "calls"],
                [[o["op"], o["self_cpu_ms"], o["share"], o["calls"]] for o in result["profile"]["ops"]],
                console,
            )
    _print_summary(result["summary"], console)
    report = write_result(NAME, result, json_path, repo_copy=mode in ("quick", "full"), results_dir=results_dir)
    for path in report.paths:
        console.print(f"wrote {path}")
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    return result


def _print_case(res: dict[str, Any], console: Console) -> None:
    rows = [
        [r["name"], r["median_ms"], r["min_ms"], r["ratio_vs_dense"], r.get("max_abs_diff")] for r in res["candidates"]
    ]
    print_table(
        f"{res['case']['name']}: ms per forward+backward"
        + (" (CPU time, one thread)" if res.get("clock") == "cpu" else ""),
        ["candidate", "median ms", "min ms", "x dense", "max |diff|"],
        rows,
        console,
        caption=f"max |diff|: vs naive_loop, on tokens routed alike (rtol {res['rtol']:g})",
    )
    for r in res["candidates"]:
        if r["note"]:
            console.print(f"  {r['name']}: {escape(r['note'])}")
    for name, why in res["skipped"].items():
        reason = escape(why.splitlines()[0] if why else "")
        console.print(f"  [yellow]skipped[/] {name}: {reason}", no_wrap=True, overflow="ellipsis")


def _print_summary(summary: dict[str, Any], console: Console) -> None:
    rows = [
        [key, g["value"], g["target"], {True: "yes", False: "no", None: "-"}[g["met"]]]
        for key, g in summary["goals"].items()
    ]
    print_table(
        f"summary, {summary['case']}",
        ["metric", "value", "goal", "met"],
        rows,
        console,
        caption=f"moekit best: {summary['best_backend']}; HF best: {summary['hf_best']}",
    )
