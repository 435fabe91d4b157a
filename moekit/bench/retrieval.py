"""Retrieval benchmark: DocumentExperts (MODE) against exact search, FAISS IVF and HNSW, on the same vectors.

Datasets:
- ``kjv``: the bundled KJV split into passages of two verses (within a chapter), embedded with MiniLM; queries
  are known items: one sentence of a random passage with 20% word dropout (MRR of the source passage).
- ``synthetic-100k`` / ``synthetic-1m``: unit vectors (d=64) from a mixture of ``n / 100`` Gaussian components
  with log-normal weights; queries are fresh draws. ``own_component_share`` (how many of a query's exact
  top-10 come from the query's own component) says how clustered the data is.

Methods, searched one thread each: exact (``IndexFlatIP``, the reference), IVF (``IndexIVFFlat``, nlist =
DocumentExperts' cluster count, nprobe swept), HNSW (``IndexHNSWFlat``, M=32, efSearch swept), and
DocumentExperts with centroid routing (m swept) and with its learned router (p swept). Per setting: recall@1
and recall@10 against exact search, MRR@10 (kjv), fraction of database vectors scored (``fraction_scanned``;
FAISS's own distance counters for IVF and HNSW), ``routing_cost`` (the routing work, centroid scores and the
learned gate, in units of one vector distance, as a fraction of n: not included in ``fraction_scanned``, as
FAISS does not count IVF's coarse quantizer), ms per query (batched, one thread, median of repeats).
Recall counts a returned id whose exact score ties the k-th best as found (tie-breaks are arbitrary).

Then the ExpertRAG and RoMA experiments (`moekit.retrieval.experiments`; size by ``experiments``): held-out
perplexity of a tiny MoE LM alone / always retrieving / gated, and Bible-part accuracy with no tuning /
router-only tuning / RoMA. Their headline numbers go to ``summary.expert_rag`` and ``summary.roma``.

Summary (headline dataset ``synthetic-100k``; every dataset under ``summary.datasets``): ``recall_at_10`` and
``fraction_scanned`` of DocumentExperts at its default setting (learned router, ``p = DEFAULT_P``; goal
recall >= 0.95 scanning <= 10%), and ``recall_minus_ivf_at_equal_scan``: that recall minus IVF's recall
interpolated at the same fraction scanned (goal >= 0).
"""

from __future__ import annotations

import io
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from moekit.bench.common import TimingConfig, environment, print_table, time_callable, write_result

NAME = "retrieval"
DEFAULT_P = 0.9
GOALS = {"recall_at_10": 0.95, "fraction_scanned": 0.10, "recall_minus_ivf_at_equal_scan": 0.0}
HEADLINE = "synthetic-100k"
EXPERIMENT_SIZES = ("none", "tiny", "quick", "full")


@dataclass(frozen=True)
class RetrievalBenchConfig:
    """What to run. ``kjv_passages=None``: every passage; ``embedder``: ``"minilm"`` or ``"hashing"``."""

    kjv_passages: int | None = 1000
    kjv_queries: int = 300
    embedder: str = "minilm"
    synthetic_sizes: tuple[int, ...] = (100_000,)
    synthetic_dim: int = 64
    synthetic_queries: int = 1000
    spread: float = 1.0
    k: int = 10
    m_sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    p_sweep: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    nprobe_sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    ef_sweep: tuple[int, ...] = (16, 32, 64, 128)
    hnsw_m: int = 32
    fit_sample: int = 10_000
    router_epochs: int = 6
    repeats: int = 3
    seed: int = 0
    experiments: str = "quick"  # ExpertRAG + RoMA size: "none", "tiny", "quick" or "full"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.experiments not in EXPERIMENT_SIZES:
            raise ValueError(f"experiments must be one of {EXPERIMENT_SIZES}, got {self.experiments!r}")


def quick_config() -> RetrievalBenchConfig:
    return RetrievalBenchConfig()


def full_config() -> RetrievalBenchConfig:
    return RetrievalBenchConfig(
        kjv_passages=None,
        kjv_queries=1000,
        synthetic_sizes=(100_000, 1_000_000),
        m_sweep=(1, 2, 4, 8, 16, 32, 64, 128),
        nprobe_sweep=(1, 2, 4, 8, 16, 32, 64, 128),
        ef_sweep=(16, 32, 64, 128, 256),
        fit_sample=20_000,
        repeats=5,
        experiments="full",
    )


def tiny_config() -> RetrievalBenchConfig:
    return RetrievalBenchConfig(
        kjv_passages=300,
        kjv_queries=40,
        embedder="hashing",
        synthetic_sizes=(3000,),
        synthetic_queries=50,
        m_sweep=(1, 4, 16),
        p_sweep=(0.5, 0.9),
        nprobe_sweep=(1, 4, 16),
        ef_sweep=(16, 64),
        fit_sample=2000,
        router_epochs=2,
        repeats=1,
        experiments="tiny",
    )


# ------------------------------------------------------------------------------------------ data
def kjv_passages(verses_per_passage: int = 2) -> list[str]:
    """The KJV as passages of ``verses_per_passage`` consecutive verses inside one chapter."""
    from moekit.data import load_kjv

    out: list[str] = []
    cur: list[str] = []
    key = None
    for v in load_kjv().verses:
        if cur and ((v.book_index, v.chapter) != key or len(cur) == verses_per_passage):
            out.append(" ".join(cur))
            cur = []
        key = (v.book_index, v.chapter)
        cur.append(v.text)
    if cur:
        out.append(" ".join(cur))
    return out


def known_item_queries(
    passages: list[str], n: int, rng: np.random.Generator, dropout: float = 0.2
) -> tuple[list[str], np.ndarray]:
    """``n`` queries: a random sentence (>= 5 words when possible) of a random passage, each word dropped with
    probability ``dropout`` (at least 3 kept). Returns (queries, (n,) source passage index)."""
    src = rng.choice(len(passages), size=min(n, len(passages)), replace=False)
    queries = []
    for i in src:
        sents = [s for s in re.split(r"(?<=[.;:?!])\s+", passages[i]) if len(s.split()) >= 5] or [passages[i]]
        words = sents[rng.integers(len(sents))].split()
        kept = [w for w in words if rng.random() >= dropout]
        queries.append(" ".join(kept if len(kept) >= 3 else words[:3]))
    return queries, src.astype(np.int64)


def synthetic_vectors(
    n: int, nq: int, dim: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mixture of ``max(1, n // 100)`` components: X (n, d), Q (nq, d), component of each row and query."""
    rng = np.random.default_rng(seed)
    nc = max(1, n // 100)
    centers = rng.standard_normal((nc, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    w = rng.lognormal(0.0, 0.7, nc)
    comp = rng.choice(nc, size=n + nq, p=w / w.sum())
    out = np.empty((n + nq, dim), dtype=np.float32)
    for s in range(0, n + nq, 262_144):  # blocked: bounded temporaries at 1M
        c = comp[s : s + 262_144]
        x = centers[c] + (spread / math.sqrt(dim)) * rng.standard_normal((len(c), dim)).astype(np.float32)
        out[s : s + len(c)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out[:n], out[n:], comp[:n], comp[n:]


# ------------------------------------------------------------------------------------------ metrics
def recall_at(
    ids: np.ndarray,
    truth: np.ndarray,
    k: int,
    id_scores: np.ndarray | None = None,
    truth_scores: np.ndarray | None = None,
    tol: float = 1e-5,
) -> float:
    """Mean share of the exact top-k found in ``ids[:, :k]``.

    With ``id_scores`` (exact inner products of the returned ids, (nq, >= k)) and ``truth_scores`` (nq, >= k),
    a returned id whose exact score ties the k-th best (within ``tol``) also counts: with ties, "the" exact
    top-k is one of several equally correct sets and the tie-break is arbitrary.
    """
    hits = []
    for i, (a, b) in enumerate(zip(ids, truth, strict=True)):
        found = set(a[:k].tolist()) & set(b[:k].tolist())
        if id_scores is not None and truth_scores is not None:
            kth = truth_scores[i, k - 1]
            found |= {int(r) for r, s in zip(a[:k], id_scores[i, :k], strict=True) if r >= 0 and s >= kth - tol}
        hits.append(min(len(found), k))
    return float(np.mean(hits)) / k


def mrr_at(ids: np.ndarray, target: np.ndarray, k: int = 10) -> float:
    """Mean reciprocal rank of ``target`` (nq,) in ``ids`` (nq, >= k); 0 when absent from the top k."""
    rr = []
    for row, t in zip(ids[:, :k], target, strict=True):
        pos = np.nonzero(row == t)[0]
        rr.append(1.0 / (pos[0] + 1) if len(pos) else 0.0)
    return float(np.mean(rr))


def interpolate_recall(curve: list[tuple[float, float]], scan: float) -> tuple[float, bool]:
    """Recall of a (scan, recall) curve at ``scan`` (linear; clamped at the ends). (recall, inside range)."""
    pts = sorted(curve)
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    return float(np.interp(scan, xs, ys)), bool(xs[0] <= scan <= xs[-1])


# ------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Reference:
    """Exact search results: ``ids`` / ``scores`` (nq, k) of database ``X`` (n, d) for queries ``Q`` (nq, d)."""

    ids: np.ndarray
    scores: np.ndarray
    X: np.ndarray
    Q: np.ndarray

    def scores_of(self, ids: np.ndarray) -> np.ndarray:
        """(nq, k) exact inner products of returned ``ids`` (-inf where -1)."""
        s = np.einsum("qd,qkd->qk", self.Q, self.X[np.maximum(ids, 0)])
        return np.where(ids >= 0, s, -np.inf)

    def recall(self, ids: np.ndarray, k: int) -> float:
        return recall_at(ids, self.ids, k, self.scores_of(ids[:, :k]), self.scores)


def _row(
    method: str,
    setting: str,
    value: float,
    ids: np.ndarray,
    ref: Reference,
    scanned: float,
    ms: float,
    k: int,
    target: np.ndarray | None,
    routing_cost: float = 0.0,
) -> dict[str, Any]:
    row = {
        "method": method,
        "setting": setting,
        "value": value,
        "recall_at_1": ref.recall(ids, 1),
        "recall_at_10": ref.recall(ids, k),
        "fraction_scanned": float(scanned),
        "routing_cost": float(routing_cost),
        "ms_per_query": float(ms),
    }
    if target is not None:
        row["mrr_at_10"] = mrr_at(ids, target, k)
    return row


def _bench_dataset(
    name: str,
    X: np.ndarray,
    Q: np.ndarray,
    target: np.ndarray | None,
    cfg: RetrievalBenchConfig,
    console: Console,
) -> dict[str, Any]:
    import faiss

    from moekit.retrieval import ClusterConfig, DocumentExperts, ExpertsConfig, RouterConfig

    n, d = X.shape
    nq = Q.shape[0]
    k = cfg.k
    timing = TimingConfig(warmup=1, repeats=cfg.repeats, threads=1)
    rows: list[dict[str, Any]] = []
    build: dict[str, float] = {}

    def timed_ms(fn) -> float:
        return time_callable(fn, timing).median_ms / nq

    # exact reference
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(X)
    build["exact"] = time.perf_counter() - t
    scores, truth_ids = flat.search(Q, k)
    truth = Reference(truth_ids, scores, X, Q)
    rows.append(_row("exact", "-", 0, truth_ids, truth, 1.0, timed_ms(lambda: flat.search(Q, k)), k, target))

    # DocumentExperts: HDBSCAN clusters, then the learned router
    t = time.perf_counter()
    de_cfg = ExpertsConfig(cluster=ClusterConfig(fit_sample=cfg.fit_sample, seed=cfg.seed))
    de = DocumentExperts.from_embeddings(X, de_cfg)
    build["document_experts"] = time.perf_counter() - t
    t = time.perf_counter()
    de.fit_router(RouterConfig(epochs=cfg.router_epochs, seed=cfg.seed))
    build["document_experts_router"] = time.perf_counter() - t
    C = de.num_clusters
    # Routing work per query in units of one database vector's distance (d multiply-adds), as a fraction of n:
    # centroid scores C * d for IVF and centroid routing, plus the gate's MLP for the learned router.
    router_cost = de.router.cost_per_query() / (n * d)
    for m in sorted({*(min(m_, C) for m_ in cfg.m_sweep), de.default_m}):
        res = de.search(Q, k, m=m)
        ms = timed_ms(lambda m=m: de.search(Q, k, m=m))
        setting = f"m={m}" + (" (default m)" if m == de.default_m else "")
        scan = res.scanned.mean() / n
        rows.append(_row("mode_centroid", setting, m, res.ids, truth, scan, ms, k, target, C / n))
    for p in sorted({*cfg.p_sweep, DEFAULT_P}):
        res = de.search(Q, k, p=p)
        ms = timed_ms(lambda p=p: de.search(Q, k, p=p))
        setting = f"p={p}" + (" (default)" if p == DEFAULT_P else "")
        scan = res.scanned.mean() / n
        rows.append(_row("mode_router", setting, p, res.ids, truth, scan, ms, k, target, router_cost))

    # IVF with the same number of lists
    t = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, C, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 1  # small sets: no warning, same k-means
    ivf.train(X)
    ivf.add(X)
    build["ivf"] = time.perf_counter() - t
    for nprobe in cfg.nprobe_sweep:
        if nprobe > C:
            continue
        ivf.nprobe = nprobe
        faiss.cvar.indexIVF_stats.reset()
        _, ids = ivf.search(Q, k)
        scanned = faiss.cvar.indexIVF_stats.ndis / (nq * n)
        rows.append(
            _row(
                "ivf",
                f"nprobe={nprobe}",
                nprobe,
                ids,
                truth,
                scanned,
                timed_ms(lambda: ivf.search(Q, k)),
                k,
                target,
                C / n,
            )
        )

    # HNSW
    t = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(X)
    build["hnsw"] = time.perf_counter() - t
    for ef in cfg.ef_sweep:
        hnsw.hnsw.efSearch = ef
        faiss.cvar.hnsw_stats.reset()
        _, ids = hnsw.search(Q, k)
        scanned = faiss.cvar.hnsw_stats.ndis / (nq * n)
        rows.append(
            _row(
                "hnsw",
                f"efSearch={ef}",
                ef,
                ids,
                truth,
                scanned,
                timed_ms(lambda: hnsw.search(Q, k)),
                k,
                target,
            )
        )

    default = next(r for r in rows if r["method"] == "mode_router" and r["value"] == DEFAULT_P)
    default_m = next(r for r in rows if r["method"] == "mode_centroid" and r["value"] == de.default_m)
    ivf_curve = [(r["fraction_scanned"], r["recall_at_10"]) for r in rows if r["method"] == "ivf"]
    ivf_at, inside = interpolate_recall(ivf_curve, default["fraction_scanned"])
    ivf_at_m, inside_m = interpolate_recall(ivf_curve, default_m["fraction_scanned"])
    summary = {
        "n": n,
        "dim": d,
        "queries": nq,
        "clusters": C,
        "cluster_size_max": int(de.cluster_sizes().max()),
        "hdbscan_noise_share": round(float(getattr(de, "noise_share", 0.0)), 4),
        "default_setting": default["setting"],
        "recall_at_10": default["recall_at_10"],
        "recall_at_1": default["recall_at_1"],
        "fraction_scanned": default["fraction_scanned"],
        "routing_cost": default["routing_cost"],
        "ivf_recall_at_equal_scan": ivf_at,
        "recall_minus_ivf_at_equal_scan": default["recall_at_10"] - ivf_at,
        "equal_scan_inside_ivf_sweep": inside,
        "centroid_default_m": {
            "setting": default_m["setting"],
            "recall_at_10": default_m["recall_at_10"],
            "fraction_scanned": default_m["fraction_scanned"],
            "recall_minus_ivf_at_equal_scan": default_m["recall_at_10"] - ivf_at_m,
            "equal_scan_inside_ivf_sweep": inside_m,
        },
        "goal_met": bool(
            default["recall_at_10"] >= GOALS["recall_at_10"]
            and default["fraction_scanned"] <= GOALS["fraction_scanned"]
            and default["recall_at_10"] - ivf_at >= GOALS["recall_minus_ivf_at_equal_scan"]
        ),
    }
    if target is not None:
        summary["mrr_at_10"] = default["mrr_at_10"]
        summary["exact_mrr_at_10"] = rows[0]["mrr_at_10"]
    print_table(
        f"retrieval: {name} (n={n:,}, d={d}, {nq} queries, {C} clusters)",
        ["method", "setting", "recall@1", "recall@10", "MRR@10", "scanned", "ms/query"],
        [
            [
                r["method"],
                r["setting"],
                r["recall_at_1"],
                r["recall_at_10"],
                r.get("mrr_at_10"),
                r["fraction_scanned"],
                r["ms_per_query"],
            ]
            for r in rows
        ],
        console=console,
    )
    return {
        "name": name,
        "summary": summary,
        "build_seconds": {k_: round(v, 3) for k_, v in build.items()},
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------ entry point
def run_retrieval_bench(
    quick: bool = True,
    json_path: str | Path | None = None,
    tiny: bool = False,
    console: Console | None = None,
    results_dir: str | Path | None = None,
    config: RetrievalBenchConfig | None = None,
) -> dict[str, Any]:
    """Run the benchmark (quick: KJV subset + 100k synthetic; full: all KJV + 100k + 1M), print tables, write
    JSON (and a recall-vs-scanned PNG next to each JSON copy); returns the result dict."""
    import faiss

    from moekit.retrieval.index import make_embedder

    console = console or Console()
    cfg = config or (tiny_config() if tiny else quick_config() if quick else full_config())
    t0 = time.perf_counter()
    threads_before = faiss.omp_get_max_threads()
    torch_before = torch.get_num_threads()
    torch.set_num_threads(1)
    datasets: list[dict[str, Any]] = []
    experiments: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        rng = np.random.default_rng(cfg.seed)
        passages = kjv_passages()
        if cfg.kjv_passages is not None and cfg.kjv_passages < len(passages):
            passages = [passages[i] for i in np.sort(rng.choice(len(passages), cfg.kjv_passages, replace=False))]
        queries, target = known_item_queries(passages, cfg.kjv_queries, rng)
        t = time.perf_counter()
        embed = make_embedder(cfg.embedder)
        X = np.asarray(embed(passages), dtype=np.float32)
        Q = np.asarray(embed(queries), dtype=np.float32)
        extra["kjv_embedding_seconds"] = round(time.perf_counter() - t, 2)
        faiss.omp_set_num_threads(1)
        datasets.append(_bench_dataset("kjv", X, Q, target, cfg, console))
        for n in cfg.synthetic_sizes:
            X, Q, comp, qcomp = synthetic_vectors(n, cfg.synthetic_queries, cfg.synthetic_dim, cfg.spread, cfg.seed)
            name = f"synthetic-{n // 1_000_000}m" if n >= 1_000_000 else f"synthetic-{n // 1000}k"
            faiss.omp_set_num_threads(threads_before)
            res = _bench_dataset(name, X, Q, None, cfg, console)
            flat = faiss.IndexFlatIP(X.shape[1])
            flat.add(X)
            _, truth = flat.search(Q, cfg.k)
            res["summary"]["own_component_share"] = float((comp[truth] == qcomp[:, None]).mean())
            datasets.append(res)
        experiments = _run_experiments(cfg, console)
    finally:
        faiss.omp_set_num_threads(threads_before)
        torch.set_num_threads(torch_before)
    by_name = {d["name"]: d["summary"] for d in datasets}
    head = by_name.get(HEADLINE) or datasets[-1]["summary"]
    summary = {
        "headline_dataset": HEADLINE if HEADLINE in by_name else datasets[-1]["name"],
        "default_setting": head["default_setting"],
        "recall_at_10": head["recall_at_10"],
        "fraction_scanned": head["fraction_scanned"],
        "recall_minus_ivf_at_equal_scan": head["recall_minus_ivf_at_equal_scan"],
        "goals": GOALS,
        "goal_met": head["goal_met"],
        "datasets": by_name,
        **_experiment_summary(experiments),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result = {
        "name": NAME,
        "mode": "tiny" if tiny else "quick" if quick else "full",
        "summary": summary,
        "cases": datasets,
        "experiments": experiments,
        "config": asdict(cfg),
        "environment": {**environment(threads=1), **extra, "faiss_version": faiss.__version__},
    }
    report = write_result(NAME, result, json_path=json_path, results_dir=results_dir)
    for path in report.paths:
        _plot(datasets, path.with_suffix(".png"))
    for note in report.notes:
        console.print(note)
    console.print(
        f"summary ({summary['headline_dataset']}, {summary['default_setting']}): recall@10 "
        f"{summary['recall_at_10']:.3f} scanning {summary['fraction_scanned']:.2%}; vs IVF at equal scan "
        f"{summary['recall_minus_ivf_at_equal_scan']:+.3f}; {summary['seconds']} s"
    )
    return result


def _run_experiments(cfg: RetrievalBenchConfig, console: Console) -> dict[str, Any]:
    """ExpertRAG (held-out perplexity: LM alone / always / gated) and RoMA (Bible-part accuracy: no tuning /
    router-only / RoMA), each with a tiny MoE LM trained here; printed as two tables."""
    if cfg.experiments == "none":
        return {}
    from moekit.retrieval.experiments import run_expert_rag_experiment, run_roma_experiment

    size = {"tiny": {"tiny": True}, "quick": {"quick": True}, "full": {"quick": False}}[cfg.experiments]
    with console.status("ExpertRAG: training a tiny MoE LM, building the kNN datastore, fitting the gate"):
        rag = run_expert_rag_experiment(seed=cfg.seed, **size)
    ppl, share = rag["ppl"], rag["retrieval_share"]
    print_table(
        f"ExpertRAG: held-out perplexity ({rag['test_tokens']:,} tokens, datastore {rag['datastore']['entries']:,})",
        ["mode", "perplexity", "share of tokens retrieving"],
        [
            ["LM alone", ppl["lm_alone"], 0.0],
            ["always retrieve", ppl["always"], share["always"]],
            ["gated", ppl["gated"], share["gated"]],
            ["random gate (same share)", ppl["random_gate"], share["random_gate"]],
        ],
        console=console,
    )
    with console.status("RoMA: training a tiny MoE LM, then tuning its routers (plain and RoMA)"):
        roma = run_roma_experiment(seed=cfg.seed, embedder=cfg.embedder, **size)
    print_table(
        f"RoMA: Bible part of held-out verses ({roma['train_samples']} tuning, {roma['test_samples']} test samples)",
        ["variant", "test accuracy", "test macro-F1", "train accuracy"],
        [[name, r["test_accuracy"], r["test_macro_f1"], r["train_accuracy"]] for name, r in roma["results"].items()],
        console=console,
    )
    return {"expert_rag": rag, "roma": roma}


def _experiment_summary(experiments: dict[str, Any]) -> dict[str, Any]:
    """Headline ExpertRAG / RoMA numbers for ``summary`` (empty when the experiments were not run)."""
    out: dict[str, Any] = {}
    if "expert_rag" in experiments:
        rag = experiments["expert_rag"]
        out["expert_rag"] = {
            "ppl_lm_alone": rag["ppl"]["lm_alone"],
            "ppl_always": rag["ppl"]["always"],
            "ppl_gated": rag["ppl"]["gated"],
            "ppl_random_gate": rag["ppl"]["random_gate"],
            "gated_retrieval_share": rag["retrieval_share"]["gated"],
            "goal": "gated ppl <= always-retrieve ppl at <= 50% of tokens retrieving",
            "goal_met": rag["goal_met"],
        }
    if "roma" in experiments:
        res = experiments["roma"]["results"]
        out["roma"] = {
            **{f"test_accuracy_{name}": r["test_accuracy"] for name, r in res.items()},
            "roma_minus_router_only_accuracy": experiments["roma"]["roma_minus_router_only_accuracy"],
            "roma_minus_no_tuning_accuracy": experiments["roma"]["roma_minus_no_tuning_accuracy"],
        }
    return out


def _plot(datasets: list[dict[str, Any]], path: Path) -> None:
    """Recall@10 vs fraction scanned, one panel per dataset; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.atomic_io import atomic_write_bytes

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    styles = {"ivf": "o-", "hnsw": "s-", "mode_centroid": "^-", "mode_router": "D-"}
    for ax, ds in zip(axes[0], datasets, strict=True):
        for method, style in styles.items():
            pts = sorted((r["fraction_scanned"], r["recall_at_10"]) for r in ds["rows"] if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=method, markersize=4)
        s = ds["summary"]
        ax.plot([s["fraction_scanned"]], [s["recall_at_10"]], "k*", markersize=12, label="default")
        ax.set_xscale("log")
        ax.axvline(GOALS["fraction_scanned"], color="grey", lw=0.8, ls="--")
        ax.axhline(GOALS["recall_at_10"], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{ds['name']} (n={s['n']:,})")
        ax.set_xlabel("fraction of vectors scanned")
        ax.set_ylabel("recall@10 vs exact")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
