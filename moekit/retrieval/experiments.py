"""The ExpertRAG and RoMA experiments on the bundled KJV corpus, each with a tiny MoE LM trained briefly.

- `run_expert_rag_experiment`: held-out perplexity of the LM alone, always-retrieve kNN-LM (global ``lam``
  and temperature tuned on tuning tokens), gated retrieval, and a random gate at the gated share.
- `run_roma_experiment`: which Bible part a held-out verse comes from, as next-token prediction of a part
  label token after the verse; no tuning vs plain router-only tuning vs RoMA.

Splits: the LM (and the datastore) use the training chapters; tuning and test tokens / task samples come from
held-out chapters, alternately assigned, so no test text is ever in the datastore or in the LM's training.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from moekit.data import (
    BOOK_PARTS,
    EOT,
    PART_NAMES,
    BPETokenizer,
    Corpus,
    SplitConfig,
    TokenizerConfig,
    TokenStream,
    load_kjv,
)
from moekit.retrieval.expert_rag import (
    Datastore,
    ExpertRAG,
    GateConfig,
    collect_hidden,
    fit_gate,
    knn_target_log_prob,
    mix_log_prob,
)
from moekit.retrieval.roma import ClassificationData, RouterTuneConfig, predict, tune_routers
from moekit.retrieval.tiny_lm import TinyLMConfig, torch_threads, train_tiny_lm

__all__ = ["run_expert_rag_experiment", "run_roma_experiment"]


def _held_out_halves(corpus: Corpus, every: int) -> tuple[Corpus, Corpus, Corpus]:
    """(train, tune, test): every ``every``-th chapter held out, then alternately to tune and test."""
    train, held = corpus.split(SplitConfig(every=every))
    chapters = held.chapters()
    tune = held.select_chapters(chapters[0::2], f"{corpus.name}:tune")
    test = held.select_chapters(chapters[1::2], f"{corpus.name}:test")
    return train, tune, test


def _sizes(quick: bool, tiny: bool) -> dict[str, Any]:
    if tiny:
        return dict(
            lm=TinyLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, block_size=32, batch_size=4, steps=8, warmup=2),
            vocab=300,
            books=3,
            store=4000,
            tune=1500,
            test=1500,
        )
    if quick:
        return dict(lm=TinyLMConfig(steps=300), vocab=2048, books=None, store=200_000, tune=30_000, test=30_000)
    return dict(lm=TinyLMConfig(steps=1500), vocab=2048, books=None, store=None, tune=60_000, test=60_000)


def _kjv(books: int | None) -> Corpus:
    corpus = load_kjv()
    if books is None:
        return corpus
    verses = tuple(v for v in corpus.verses if v.book_index < books)
    return Corpus("kjv-small", verses, corpus.books, corpus.part_names)


# ------------------------------------------------------------------------------------------ ExpertRAG
def run_expert_rag_experiment(quick: bool = True, seed: int = 0, tiny: bool = False, k: int = 16) -> dict[str, Any]:
    """Perplexity on held-out KJV chapters: LM alone, always retrieve, gated (+ share retrieving)."""
    t0 = time.perf_counter()
    sz = _sizes(quick, tiny)
    lm_cfg = dataclasses.replace(sz["lm"], seed=seed)
    train, tune, test = _held_out_halves(_kjv(sz["books"]), every=10)
    tok = BPETokenizer.train([v.text for v in train], TokenizerConfig(vocab_size=sz["vocab"]))
    streams = {name: TokenStream.from_corpus(c, tok) for name, c in (("train", train), ("tune", tune), ("test", test))}
    model, losses = train_tiny_lm(streams["train"], tok.vocab_size, lm_cfg)
    t_lm = time.perf_counter() - t0

    t1 = time.perf_counter()
    store = Datastore.from_stream(model, streams["train"], sz["store"])
    t_store = time.perf_counter() - t1
    h_tune, y_tune, lp_tune = collect_hidden(model, streams["tune"], sz["tune"])
    d2, vals = store.search(h_tune.numpy(), k)
    # Always-retrieve baseline: temperature and global lam tuned on the tuning tokens.
    scale = float(np.median(d2[:, 0])) + 1e-6
    best = (math.inf, 1.0, 0.0)
    for tmul in (0.03, 0.1, 0.3, 1.0, 3.0):
        lpk = torch.from_numpy(knn_target_log_prob(d2, vals, y_tune.numpy(), tmul * scale))
        for lam in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
            nll = float(-mix_log_prob(lp_tune, lpk, lam).mean())
            if nll < best[0]:
                best = (nll, tmul * scale, lam)
    _, temperature, lam = best
    lp_knn_tune = torch.from_numpy(knn_target_log_prob(d2, vals, y_tune.numpy(), temperature)).float()
    gate = fit_gate(h_tune, lp_tune, lp_knn_tune, GateConfig(seed=seed, epochs=4 if tiny else 30))

    rag = ExpertRAG(model, store, gate, k=k, temperature=temperature, lam=lam)
    res = _evaluate_rag(rag, streams["test"], sz["test"], seed)
    res.update(
        lm={"config": dataclasses.asdict(lm_cfg), "final_train_loss": float(np.mean(losses[-20:]))},
        datastore={"entries": len(store), "exact_search": store.exact, "k": k, "temperature": temperature},
        always_lam=lam,
        gate_threshold=float(gate.threshold),
        tune_tokens=int(y_tune.numel()),
        seconds={
            "lm_train": round(t_lm, 1),
            "datastore": round(t_store, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    )
    res["goal_met"] = bool(res["ppl"]["gated"] <= res["ppl"]["always"] and res["retrieval_share"]["gated"] <= 0.5)
    return res


@torch.no_grad()
def _evaluate_rag(rag: ExpertRAG, stream: TokenStream, max_tokens: int | None, seed: int) -> dict[str, Any]:
    """Run ExpertRAG.forward in every mode over consecutive test windows."""
    from moekit.data import validation_batches

    L = rag.model.config.max_seq_len
    nll = {"never": [], "always": [], "gated": [], "random_gate": []}
    share = {"always": [], "gated": [], "random_gate": []}
    gen = torch.Generator().manual_seed(seed)
    seen = 0
    for batch in validation_batches(stream, 16, L):
        y = batch.targets[..., None]
        lps = {}
        for mode in ("never", "always", "gated"):
            lps[mode], used = rag(batch.inputs, mode)
            nll[mode].append(-lps[mode].gather(-1, y).squeeze(-1).reshape(-1))
            if mode != "never":
                share[mode].append(used.reshape(-1).float())
        # Random gate at the gated share, global lam: does the learned gate pick the right tokens?
        rnd = torch.rand(y.shape[:2], generator=gen) < float(share["gated"][-1].mean())
        lp_r = torch.where(rnd[..., None], lps["always"], lps["never"])
        nll["random_gate"].append(-lp_r.gather(-1, y).squeeze(-1).reshape(-1))
        share["random_gate"].append(rnd.reshape(-1).float())
        seen += y.numel()
        if max_tokens is not None and seen >= max_tokens:
            break
    ppl = {m: float(torch.cat(v).mean().exp()) for m, v in nll.items()}
    return {
        "test_tokens": seen,
        "ppl": {
            "lm_alone": ppl["never"],
            "always": ppl["always"],
            "gated": ppl["gated"],
            "random_gate": ppl["random_gate"],
        },
        "retrieval_share": {m: float(torch.cat(v).mean()) for m, v in share.items()},
    }


# ------------------------------------------------------------------------------------------ RoMA
def _label_token(part: str) -> str:
    return f"<|{part}|>"


def run_roma_experiment(
    quick: bool = True,
    seed: int = 0,
    tiny: bool = False,
    embedder: str = "minilm",
    lam: float = 1.0,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Bible-part classification of held-out verses by a tiny MoE LM: no tuning, router-only, RoMA."""
    with torch_threads(threads):
        return _roma(quick, seed, tiny, embedder, lam)


def _roma(quick: bool, seed: int, tiny: bool, embedder: str, lam: float) -> dict[str, Any]:
    from moekit.retrieval.index import make_embedder

    t0 = time.perf_counter()
    sz = _sizes(quick, tiny)
    lm_cfg = dataclasses.replace(sz["lm"], seed=seed, steps=sz["lm"].steps * (1 if tiny else 2))
    corpus = load_kjv()
    train, tune, test = _held_out_halves(corpus, every=10)
    specials = (EOT, *(_label_token(p) for p in PART_NAMES))
    tok = BPETokenizer.train([v.text for v in train], TokenizerConfig(vocab_size=sz["vocab"], special_tokens=specials))
    label_ids = torch.tensor([tok.token_to_id(_label_token(p)) for p in PART_NAMES])
    # Pretraining text: training verses in random order, each followed by its part label.
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train.verses))
    if tiny:
        order = order[:3000]
    verses = [train.verses[i] for i in order]
    enc = tok.encode_batch([f"{v.text}{_label_token(v.part)}\n" for v in verses])
    stream = TokenStream.from_ids([t for e in enc for t in e])
    model, losses = train_tiny_lm(stream, tok.vocab_size, lm_cfg)
    t_lm = time.perf_counter() - t0

    per_part = {"tiny": (20, 10), "quick": (100, 60), "full": (200, 150)}[
        "tiny" if tiny else "quick" if quick else "full"
    ]
    task_train = _task_samples(tune, per_part[0], rng)
    task_test = _task_samples(test, per_part[1], rng)
    max_len = lm_cfg.block_size

    def data_of(vs):  # noqa: E306
        return ClassificationData.from_token_lists(
            tok.encode_batch([v.text for v in vs]), [PART_NAMES.index(v.part) for v in vs], max_len
        )

    d_train, d_test = data_of(task_train), data_of(task_test)
    emb_fn = make_embedder(embedder)
    emb = np.asarray(emb_fn([v.text for v in task_train]), dtype=np.float32)

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    results: dict[str, Any] = {"no_tuning": _scores(model, d_train, d_test, label_ids)}
    tune_cfg = RouterTuneConfig(epochs=2 if tiny else 6, seed=seed)
    for name, cfg in (("router_only", tune_cfg), ("roma", dataclasses.replace(tune_cfg, lam=lam))):
        model.load_state_dict(base_state)
        hist = tune_routers(model, d_train, label_ids, cfg, emb=emb if cfg.lam > 0 else None)
        results[name] = {**_scores(model, d_train, d_test, label_ids), "history": hist}
    model.load_state_dict(base_state)
    return {
        "task": "Bible part of a held-out verse: argmax over the 6 part-label tokens after the verse",
        "parts": list(PART_NAMES),
        "train_samples": len(d_train),
        "test_samples": len(d_test),
        "embedder": embedder,
        "lam": lam,
        "results": results,
        "roma_minus_router_only_accuracy": results["roma"]["test_accuracy"] - results["router_only"]["test_accuracy"],
        "roma_minus_no_tuning_accuracy": results["roma"]["test_accuracy"] - results["no_tuning"]["test_accuracy"],
        "lm": {"config": dataclasses.asdict(lm_cfg), "final_train_loss": float(np.mean(losses[-20:]))},
        "seconds": {"lm_train": round(t_lm, 1), "total": round(time.perf_counter() - t0, 1)},
    }


def _task_samples(corpus: Corpus, per_part: int, rng: np.random.Generator) -> list:
    """Up to ``per_part`` random verses of each part (BOOK_PARTS), shuffled."""
    out = []
    for part in PART_NAMES:
        vs = [v for v in corpus.verses if BOOK_PARTS[v.book] == part and v.text.strip()]
        take = rng.choice(len(vs), min(per_part, len(vs)), replace=False) if vs else []
        out += [vs[i] for i in take]
    return [out[i] for i in rng.permutation(len(out))]


def _scores(
    model, d_train: ClassificationData, d_test: ClassificationData, label_ids: torch.Tensor
) -> dict[str, float]:
    out = {}
    for name, d in (("train", d_train), ("test", d_test)):
        pred = predict(model, d, label_ids)
        out[f"{name}_accuracy"] = float((pred == d.labels).float().mean())
        out[f"{name}_macro_f1"] = _macro_f1(pred, d.labels, len(PART_NAMES))
    return out


def _macro_f1(pred: torch.Tensor, y: torch.Tensor, c: int) -> float:
    f1 = []
    for k in range(c):
        tp = int(((pred == k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1)) if f1 else 0.0
