"""End-to-end model federation on the bundled corpus: which part of the Bible a verse comes from.

Three domain experts, each a different kind of whole model, each knowing only its own parts:

- ``law_history``: a tiny Hugging Face ``BertForSequenceClassification`` (built from a config, trained here on
  moekit BPE tokens), saved as safetensors; its loader rebuilds it from the config and reads the file.
- ``poetry_prophets``: a scikit-learn pipeline (TF-IDF + logistic regression); its loader fits it on demand.
- ``new_testament``: a torch bag-of-words module (``nn.EmbeddingBag`` + linear), saved as safetensors.

A ``Router`` on sentence embeddings (MiniLM by default) sends each verse to one (or two) experts; a global
TF-IDF + logistic-regression model over all six parts is the monolithic baseline.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.tabular.federation import Embedder, Expert, Federation, Router, hashing_embedder, minilm_embedder

DOMAINS: dict[str, tuple[str, ...]] = {
    "law_history": ("law", "history"),
    "poetry_prophets": ("poetry", "prophets"),
    "new_testament": ("gospels", "epistles"),
}


class BagOfWords(nn.Module):
    """Mean of token embeddings -> linear: (ids, offsets) -> logits."""

    def __init__(self, vocab_size: int, n_classes: int, dim: int = 32) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.head = nn.Linear(dim, n_classes)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.head(self.bag(*batch))


def _sample(per_part: int, seed: int) -> tuple[list[Any], list[Any]]:
    from moekit.data import SplitConfig, load_kjv

    corpus = load_kjv()
    train_c, test_c = corpus.split(SplitConfig(every=5, seed=seed))
    rng = random.Random(seed)
    out = []
    for c, n in ((train_c, per_part), (test_c, max(1, per_part // 3))):
        verses = []
        for part in corpus.part_names:
            pool = [v for v in c if v.part == part]
            verses += rng.sample(pool, min(n, len(pool)))
        rng.shuffle(verses)
        out.append(verses)
    return out[0], out[1]


def _train(model: nn.Module, batches: list[tuple[Any, torch.Tensor]], epochs: int, lr: float, call: Any) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            loss = nn.functional.cross_entropy(call(model, x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def build_experts(train: list[Any], workdir: Path, tiny: bool = False, seed: int = 0) -> list[Expert]:
    """Train the three domain experts; return ``Expert``s whose loaders read them back lazily."""
    from safetensors.torch import load_file, save_file
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from transformers import BertConfig, BertForSequenceClassification

    from moekit.data import BPETokenizer, TokenizerConfig

    torch.manual_seed(seed)
    texts = {d: [v.text for v in train if v.part in parts] for d, parts in DOMAINS.items()}
    labels = {d: [v.part for v in train if v.part in parts] for d, parts in DOMAINS.items()}
    tok = BPETokenizer.train([v.text for v in train], TokenizerConfig(vocab_size=300 if tiny else 1024))
    max_len = 16 if tiny else 48

    def tokenize(batch: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.full((len(batch), max_len), tok.eot_id, dtype=torch.long)
        mask = torch.zeros((len(batch), max_len), dtype=torch.long)
        for i, seq in enumerate(tok.encode_batch(list(batch))):
            seq = seq[:max_len]
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq, dtype=torch.long), 1
        return {"input_ids": ids, "attention_mask": mask}

    def bag(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, offsets = [], []
        for seq in tok.encode_batch(list(batch)):
            offsets.append(len(ids))
            ids += seq or [tok.eot_id]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)

    def batches(d: str, featurize: Any) -> list[tuple[Any, torch.Tensor]]:
        y = torch.tensor([DOMAINS[d].index(p) for p in labels[d]])
        return [(featurize(texts[d][s : s + 32]), y[s : s + 32]) for s in range(0, len(y), 32)]

    epochs = 1 if tiny else 6
    # 1. Hugging Face: a tiny BERT from a config (nothing downloaded)
    bert_cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_len,
        num_labels=2,
    )
    bert = BertForSequenceClassification(bert_cfg)
    _train(bert, batches("law_history", tokenize), epochs, 2e-3, lambda m, x: m(**x).logits)
    save_file(bert.state_dict(), str(workdir / "law_history.safetensors"))

    def load_bert() -> Any:
        model = BertForSequenceClassification(bert_cfg)
        model.load_state_dict(load_file(str(workdir / "law_history.safetensors")))
        return model

    # 2. torch module
    bow = BagOfWords(tok.vocab_size, 2)
    _train(bow, batches("new_testament", bag), 2 * epochs, 1e-2, lambda m, x: m(x))
    save_file(bow.state_dict(), str(workdir / "new_testament.safetensors"))

    def load_bow() -> Any:
        model = BagOfWords(tok.vocab_size, 2)
        model.load_state_dict(load_file(str(workdir / "new_testament.safetensors")))
        return model

    # 3. scikit-learn: fitted when first chosen
    def load_sklearn() -> Any:
        return make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0, max_iter=2000)).fit(
            texts["poetry_prophets"], labels["poetry_prophets"]
        )

    return [
        Expert.from_hf("law_history", load_bert, tokenize, DOMAINS["law_history"]),
        Expert.from_sklearn("poetry_prophets", load_sklearn, sorted(DOMAINS["poetry_prophets"])),
        Expert.from_torch("new_testament", load_bow, bag, DOMAINS["new_testament"]),
    ]


def _memo(embed: Embedder) -> Embedder:
    """The embedder with a per-text cache."""
    seen: dict[str, np.ndarray] = {}

    def cached(texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in seen))
        if todo:
            seen.update(zip(todo, np.asarray(embed(todo)), strict=True))
        return np.stack([seen[t] for t in texts])

    return cached


def run_federation_example(
    quick: bool = False, *, tiny: bool = False, embedder: str | Embedder = "minilm", seed: int = 0
) -> dict[str, Any]:
    """Build, route and score the three-expert federation; returns accuracies and load counts.

    ``embedder``: ``"minilm"`` (bundled all-MiniLM-L6-v2), ``"hashing"`` or a callable texts -> (n, d).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    embed = (
        embedder
        if callable(embedder)
        else {"minilm": minilm_embedder, "hashing": hashing_embedder}[embedder]()
        if embedder in ("minilm", "hashing")
        else None
    )
    if embed is None:
        raise ValueError(f"embedder must be 'minilm', 'hashing' or a callable, got {embedder!r}")
    embed = _memo(embed)  # the test verses are routed several times below: embed each once
    train, test = _sample(30 if tiny else 300 if quick else 900, seed)
    names = list(DOMAINS)
    domain_of = {p: i for i, parts in enumerate(DOMAINS.values()) for p in parts}
    x_test, y_test = [v.text for v in test], [v.part for v in test]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        experts = build_experts(train, Path(tmp), tiny=tiny, seed=seed)
        router = Router(embed, len(experts)).fit([v.text for v in train], [domain_of[v.part] for v in train])
        result: dict[str, Any] = {"experts": {e.name: list(e.labels) for e in experts}}
        for k in (1, 2):
            fed = Federation(experts, router, k=k, max_loaded=1)
            correct = 0
            for s in range(0, len(x_test), 32):  # batches, as a service would see them
                correct += sum(p == t for p, t in zip(fed.predict(x_test[s : s + 32]), y_test[s : s + 32], strict=True))
            result[f"k{k}"] = {
                "accuracy": round(correct / len(x_test), 4),
                "batches": -(-len(x_test) // 32),
                "loads": sum(fed.load_counts.values()),  # with max_loaded=1: at most one model resident
                "per_expert": dict(fed.load_counts),
            }
        routed = router.route(x_test, 1)[0][:, 0]
        result["router_accuracy"] = round(float(np.mean(routed == [domain_of[p] for p in y_test])), 4)
        # oracle routing: each verse to its true domain's expert
        oracle = 0
        for d, e in enumerate(experts):
            rows = [i for i, p in enumerate(y_test) if domain_of[p] == d]
            pred = e.predict(e.loader(), [x_test[i] for i in rows]).argmax(1)
            oracle += sum(e.labels[j] == y_test[i] for j, i in zip(pred, rows, strict=True))
        result["oracle_routing_accuracy"] = round(oracle / len(x_test), 4)
        # lazy loading: one verse through a fresh federation loads only the expert it is routed to
        fed = Federation(experts, router)
        fed.predict(x_test[:1])
        result["one_verse"] = {"routed_to": names[int(routed[0])], "loads": dict(fed.load_counts)}
    glob = make_pipeline(TfidfVectorizer(), LogisticRegression(C=10.0, max_iter=2000)).fit(
        [v.text for v in train], [v.part for v in train]
    )
    result["monolithic_tfidf_accuracy"] = round(float(np.mean(glob.predict(x_test) == np.array(y_test))), 4)
    result["train_verses"], result["test_verses"] = len(train), len(test)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result
