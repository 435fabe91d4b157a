"""HF interop benchmark: forward tokens/s of real transformers MoE models, as shipped vs patched with moekit.

For each family a small but real model (4 layers, hidden 512, the family's expert count and top-k, random
weights) runs a no-grad eval forward over the same token batch:

- ``hf/<impl>``: the unpatched model under every ``experts_implementation`` transformers registers
  (``eager``, ``grouped_mm``, ``batched_mm`` ...; families without the switch run as they are: ``default``);
- ``moekit``: a deep copy of that model after ``moekit.interop.patch_hf_model``.

Before timing, the patched logits are checked against the unpatched model's (``max_abs_diff`` in the result).
The summary gives ``speedup_vs_hf_best`` per family: best HF time / moekit time (goal >= 1.0).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from rich.console import Console
from torch import nn

from moekit.bench.common import (
    TimingConfig,
    environment,
    num_threads,
    print_table,
    time_interleaved,
    write_result,
)

NAME = "hf"
GOAL = 1.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class HFCase:
    """One model: ``family`` with ``layers`` x ``hidden``, ``experts`` of width ``d_ff``, top-``k``, on a
    ``batch`` x ``seq`` token batch."""

    family: str
    experts: int
    k: int
    d_ff: int
    layers: int = 4
    hidden: int = 512
    heads: int = 8
    vocab: int = 1024
    batch: int = 4
    seq: int = 256
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.family not in BUILDERS:
            raise ValueError(f"family must be one of {sorted(BUILDERS)}, got {self.family!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return f"{self.family}-E{self.experts}-k{self.k}-{self.dtype}"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


# ---------------------------------------------------------------------------------------------- models
def _common(case: HFCase) -> dict[str, Any]:
    return dict(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.heads,
        max_position_embeddings=max(case.seq, 64),
        num_experts_per_tok=case.k,
    )


def _mixtral(case: HFCase) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**_common(case), intermediate_size=case.d_ff, num_local_experts=case.experts)
    return MixtralForCausalLM(cfg)


def _qwen2_moe(case: HFCase) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        **_common(case),
        intermediate_size=4 * case.d_ff,
        moe_intermediate_size=case.d_ff,
        shared_expert_intermediate_size=4 * case.d_ff,
        num_experts=case.experts,
    )
    return Qwen2MoeForCausalLM(cfg)


def _qwen3_moe(case: HFCase) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        **_common(case),
        intermediate_size=4 * case.d_ff,
        moe_intermediate_size=case.d_ff,
        num_experts=case.experts,
        norm_topk_prob=True,
        head_dim=case.hidden // case.heads,
    )
    return Qwen3MoeForCausalLM(cfg)


def _olmoe(case: HFCase) -> nn.Module:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(**_common(case), intermediate_size=case.d_ff, num_experts=case.experts)
    return OlmoeForCausalLM(cfg)


def _deepseek_v3(case: HFCase) -> nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    head = case.hidden // case.heads
    cfg = DeepseekV3Config(
        **_common(case),
        intermediate_size=4 * case.d_ff,
        moe_intermediate_size=case.d_ff,
        n_routed_experts=case.experts,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=case.hidden // 4,
        q_lora_rank=case.hidden // 2,
        qk_rope_head_dim=head // 2,
        qk_nope_head_dim=head,
        v_head_dim=head,
    )
    return DeepseekV3ForCausalLM(cfg)


def _switch(case: HFCase) -> nn.Module:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        vocab_size=case.vocab,
        d_model=case.hidden,
        d_kv=case.hidden // case.heads,
        d_ff=case.d_ff,
        num_layers=case.layers,
        num_decoder_layers=case.layers,
        num_heads=case.heads,
        num_experts=case.experts,
        expert_capacity=max(1, round(1.25 * case.seq / case.experts)),  # capacity factor 1.25 per sequence
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        decoder_start_token_id=0,
    )
    return SwitchTransformersForConditionalGeneration(cfg)


BUILDERS: dict[str, Callable[[HFCase], nn.Module]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "switch_transformers": _switch,
}


def quick_cases() -> list[HFCase]:
    """One fp32 model per family, batch 2 x 128 tokens."""
    return [replace(c, batch=2, seq=128) for c in full_cases() if c.dtype == "fp32"]


def full_cases() -> list[HFCase]:
    """Each family's model in fp32 and bf16, batch 4 x 256 tokens."""
    base = [
        HFCase("mixtral", experts=8, k=2, d_ff=1024),
        HFCase("qwen2_moe", experts=60, k=4, d_ff=256),
        HFCase("qwen3_moe", experts=64, k=8, d_ff=256),
        HFCase("olmoe", experts=64, k=8, d_ff=256),
        HFCase("deepseek_v3", experts=64, k=8, d_ff=256),
        HFCase("switch_transformers", experts=8, k=1, d_ff=1024),
    ]
    return base + [replace(c, dtype="bf16") for c in base]


def tiny_cases() -> list[HFCase]:
    """Test-sized models (milliseconds): the structure of the results, not speed."""
    small = dict(layers=2, hidden=32, heads=4, vocab=64, batch=2, seq=8)
    return [
        HFCase("qwen3_moe", experts=8, k=2, d_ff=16, **small),
        HFCase("switch_transformers", experts=4, k=1, d_ff=16, **small),
    ]


# ---------------------------------------------------------------------------------------------- one case
def _inputs(case: HFCase, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen)
    if case.family == "switch_transformers":
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def _experts_impls(model: nn.Module) -> list[str]:
    """The ``experts_implementation`` names this model accepts (``["default"]`` without that switch)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    try:
        can_set = model._can_set_experts_implementation()
    except AttributeError:
        can_set = False
    if not can_set:
        return ["default"]
    return ["eager", *(name for name in ALL_EXPERTS_FUNCTIONS.keys() if name in ("grouped_mm", "batched_mm"))]


def _hf_forward(model: nn.Module, impl: str, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        if impl != "default":
            model.set_experts_implementation(impl)
        with torch.no_grad():
            return model(**inputs).logits

    return run


def _batched_mm_gib(case: HFCase, element_size: int) -> float:
    """``batched_mm`` gathers one (gate_up + down) weight set per token-expert pair per layer."""
    return case.tokens * case.k * 3 * case.hidden * case.d_ff * element_size / 2**30


def bench_case(case: HFCase, timing: TimingConfig, seed: int = 0, gather_limit_gib: float = 2.0) -> dict[str, Any]:
    """Build the model and its patched copy, check logits agree, time forward passes interleaved."""
    from moekit.interop import patch_hf_model

    torch.manual_seed(seed)
    model = BUILDERS[case.family](case).eval().to(DTYPES[case.dtype])
    patched = copy.deepcopy(model)
    n_patched = patch_hf_model(patched)
    inputs = _inputs(case, seed + 1)
    impls = _experts_impls(model)
    skipped: dict[str, str] = {}
    gib = _batched_mm_gib(case, torch.finfo(DTYPES[case.dtype]).bits // 8)
    if "batched_mm" in impls and gib > gather_limit_gib:
        impls.remove("batched_mm")
        skipped["hf/batched_mm"] = f"would gather ~{gib:.1f} GiB of expert weights > {gather_limit_gib:g} GiB"
    candidates = {f"hf/{impl}": _hf_forward(model, impl, inputs) for impl in impls}
    candidates["moekit"] = _hf_forward(patched, "default", inputs)
    reference = candidates["hf/grouped_mm" if "grouped_mm" in impls else f"hf/{impls[0]}"]()  # the default
    diff = float((candidates["moekit"]() - reference).abs().max())
    measured = time_interleaved(candidates, timing, on_error=(Exception,))
    skipped.update(measured.failed)
    rows = []
    for name, t in measured.timings.items():
        rows.append(
            {
                "name": name,
                "kind": "moekit" if name == "moekit" else "hf",
                **t.to_dict(),
                "tokens_per_s": round(case.tokens / (t.median_ms / 1e3), 1),
            }
        )
    return {
        "case": case.to_dict(),
        "patched_blocks": n_patched,
        "max_abs_logit_diff": diff,
        "logit_scale": float(reference.abs().max()),
        "candidates": rows,
        "skipped": skipped,
    }


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``speedup_vs_hf_best`` per case (best HF median / moekit median) and whether each meets the goal."""
    per_case: dict[str, Any] = {}
    for res in results:
        rows = {r["name"]: r for r in res["candidates"]}
        hf = [r for r in rows.values() if r["kind"] == "hf"]
        moe = rows.get("moekit")
        best = min(hf, key=lambda r: r["median_ms"]) if hf else None
        speedup = round(best["median_ms"] / moe["median_ms"], 3) if best and moe else None
        per_case[res["case"]["name"]] = {
            "speedup_vs_hf_best": speedup,
            "hf_best": best["name"] if best else None,
            "hf_best_tokens_per_s": best["tokens_per_s"] if best else None,
            "moekit_tokens_per_s": moe["tokens_per_s"] if moe else None,
            "max_abs_logit_diff": res["max_abs_logit_diff"],
            "met": None if speedup is None else speedup >= GOAL,
        }
    speedups = [v["speedup_vs_hf_best"] for v in per_case.values() if v["speedup_vs_hf_best"] is not None]
    return {
        "goal": f"speedup_vs_hf_best >= {GOAL:g}",
        "speedup_vs_hf_best": {name: v["speedup_vs_hf_best"] for name, v in per_case.items()},
        "min_speedup_vs_hf_best": min(speedups) if speedups else None,
        "geomean_speedup_vs_hf_best": (
            round(math.exp(sum(math.log(s) for s in speedups) / len(speedups)), 3) if speedups else None
        ),
        "cases": per_case,
    }


# ---------------------------------------------------------------------------------------------- entry point
def run_hf_bench(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    *,
    threads: int | None = None,
    tiny: bool = False,
    cases: Sequence[HFCase] | None = None,
    timing: TimingConfig | None = None,
    seed: int = 0,
    console: Console | None = None,
    results_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the HF interop benchmark, print a table, write the JSON result and return it.

    Cases: ``cases`` if given, else ``tiny_cases()`` (tests), ``quick_cases()`` or ``full_cases()``. Only
    quick and full runs are copied to ``benchmarks/results/hf.json``.
    """
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("the hf benchmark needs transformers (pip install moekit[hf])") from exc
    mode = "tiny" if tiny else "custom" if cases is not None else "quick" if quick else "full"
    chosen = list(cases) if cases is not None else {"tiny": tiny_cases, "quick": quick_cases}.get(mode, full_cases)()
    if not chosen:
        raise ValueError("no cases to run")
    timing = timing or {"tiny": TimingConfig(1, 2), "quick": TimingConfig(1, 3)}.get(mode, TimingConfig(1, 5))
    if threads is not None:
        timing = replace(timing, threads=threads)
    console = console or Console()
    results = []
    with num_threads(timing.threads) as used_threads:
        for case in chosen:
            console.print(f"[bold]hf bench[/] {case.name}: {case.batch}x{case.seq} tokens ...")
            results.append(bench_case(case, timing, seed))
        result: dict[str, Any] = {
            "name": NAME,
            "mode": mode,
            "summary": summarize(results),
            "cases": results,
            "environment": environment(used_threads),
            "config": {"seed": seed, "warmup": timing.warmup, "repeats": timing.repeats},
        }
    _print(result, console)
    report = write_result(NAME, result, json_path, repo_copy=mode in ("quick", "full"), results_dir=results_dir)
    for path in report.paths:
        console.print(f"wrote {path}")
    for note in report.notes:
        console.print(f"[dim]{note}[/]")
    return result


def _print(result: dict[str, Any], console: Console) -> None:
    rows = []
    for res in result["cases"]:
        name = res["case"]["name"]
        for r in res["candidates"]:
            rows.append([name, r["name"], r["median_ms"], r["tokens_per_s"], res["max_abs_logit_diff"]])
        for cand, why in res["skipped"].items():
            rows.append([name, cand, None, None, f"skipped: {why[:60]}"])
    print_table(
        "forward (no grad): ms and tokens/s",
        ["model", "candidate", "median ms", "tokens/s", "logit diff"],
        rows,
        console,
    )
    summary = result["summary"]
    print_table(
        f"moekit vs best transformers experts_implementation (goal: {summary['goal']})",
        ["model", "hf best", "hf tok/s", "moekit tok/s", "speedup"],
        [
            [name, v["hf_best"], v["hf_best_tokens_per_s"], v["moekit_tokens_per_s"], v["speedup_vs_hf_best"]]
            for name, v in summary["cases"].items()
        ],
        console,
    )
