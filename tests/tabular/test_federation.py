"""Model federation: whole models (torch, Hugging Face, scikit-learn) as lazily loaded experts behind a router."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moekit.tabular.federation import Expert, Federation, Router, hashing_embedder

TEXTS = {
    0: ["the lord spoke unto moses", "moses went up the mount", "the law of moses and the lord"],
    1: ["the sheep of the field graze", "a sheep and a lamb in the field", "the field is full of sheep"],
    2: ["paul wrote to the church", "the church at corinth", "grace to the church from paul"],
}


def _routed_texts() -> tuple[list[str], list[int]]:
    xs = [t for e in TEXTS for t in TEXTS[e]]
    ys = [e for e in TEXTS for _ in TEXTS[e]]
    return xs, ys


class CountingLoader:
    def __init__(self, make):
        self.make, self.calls = make, 0

    def __call__(self):
        self.calls += 1
        return self.make()


def _torch_expert(name: str, label_shift: int) -> tuple[Expert, CountingLoader]:
    """A torch module whose logits always favour its own first label (so the output shows who answered)."""

    def make() -> nn.Module:
        lin = nn.Linear(1, 2)
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.copy_(torch.tensor([2.0, 0.0]))
        return lin

    loader = CountingLoader(make)
    labels = [f"{name}_a", f"{name}_b"]
    return Expert.from_torch(name, loader, lambda xs: torch.ones(len(xs), 1), labels), loader


def _router(n: int = 3) -> Router:
    xs, ys = _routed_texts()
    return Router(hashing_embedder(64), n).fit(xs, ys)


def test_only_chosen_experts_are_loaded():
    experts, loaders = zip(*(_torch_expert(f"e{i}", i) for i in range(3)), strict=True)
    fed = Federation(list(experts), _router(), k=1)
    pred = fed.predict(["moses and the law of the lord"])
    assert pred == ["e0_a"]
    assert [ld.calls for ld in loaders] == [1, 0, 0]
    assert fed.resident() == ["e0"]
    fed.predict(["the lord and moses"])  # cached: no second load
    assert [ld.calls for ld in loaders] == [1, 0, 0] and fed.cache.stats.hits == 1
    fed.predict(["paul and the church"])
    assert [ld.calls for ld in loaders] == [1, 0, 1]


def test_lru_cache_bounds_resident_models():
    experts, loaders = zip(*(_torch_expert(f"e{i}", i) for i in range(3)), strict=True)
    fed = Federation(list(experts), _router(), k=1, max_loaded=1)
    for text in ["moses the lord", "sheep in the field", "moses the law"]:
        fed.predict([text])
        assert len(fed.resident()) == 1
    assert [ld.calls for ld in loaders] == [2, 1, 0]  # e0 evicted by e1, then reloaded
    assert fed.load_counts == {"e0": 2, "e1": 1, "e2": 0}


def test_top2_mixes_over_the_union_of_labels():
    experts, _ = zip(*(_torch_expert(f"e{i}", i) for i in range(3)), strict=True)
    fed = Federation(list(experts), _router(), k=2)
    probs, routes = fed.predict_with_routes(["moses went up", "paul and the church"])
    assert probs.shape == (2, 6) and routes.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    for row in range(2):  # probability mass only on the labels of the two chosen experts
        chosen = {fed.labels_[j].split("_")[0] for j in np.nonzero(probs[row] > 0)[0]}
        assert chosen == {f"e{i}" for i in routes[row]}


def test_sklearn_and_hf_experts():
    pytest.importorskip("transformers")
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from transformers import BertConfig, BertForSequenceClassification

    sk = make_pipeline(CountVectorizer(), LogisticRegression()).fit(["good day", "bad day"] * 3, ["pos", "neg"] * 3)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )

    def tokenize(texts):
        ids = torch.tensor([[min(len(w), 49) for w in t.split()][:4] + [0] * (4 - len(t.split()[:4])) for t in texts])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    hf_loader = CountingLoader(lambda: BertForSequenceClassification(cfg))
    experts = [
        Expert.from_sklearn("sentiment", lambda: sk, ["neg", "pos"]),
        Expert.from_hf("topic", hf_loader, tokenize, ["x", "y", "z"]),
    ]
    router = Router(hashing_embedder(32), 2).fit(["good day", "bad day", "topic one", "topic two"], [0, 0, 1, 1])
    fed = Federation(experts, router)
    assert fed.predict(["good day"]) == ["pos"] and hf_loader.calls == 0
    probs = fed.predict_proba(["topic one", "topic two"])
    assert probs.shape == (2, 5) and hf_loader.calls == 1
    np.testing.assert_allclose(probs[:, 2:].sum(axis=1), 1.0, atol=1e-6)


def test_router_from_descriptions():
    router = Router.from_descriptions(hashing_embedder(64), ["moses law lord", "sheep field", "paul church"])
    idx, w = router.route(["the church of paul", "sheep"], k=1)
    assert idx[:, 0].tolist() == [2, 1] and np.allclose(w, 1.0)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    e, _ = _torch_expert("e0", 0)
    with pytest.raises(ValueError, match="empty list"):
        Federation([], _router())
    with pytest.raises(ValueError, match="router scores 3 experts but the federation has 1"):
        Federation([e], _router())
    with pytest.raises(ValueError, match="names must be unique"):
        Federation([e, e], Router.from_descriptions(hashing_embedder(8), ["a", "b"]))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        Federation([_torch_expert(f"e{i}", i)[0] for i in range(3)], _router(), k=4)
    with pytest.raises(ValueError, match="labels is empty"):
        Expert("x", lambda: None, lambda m, xs: None, [])
    with pytest.raises(RuntimeError, match="not fitted"):
        Router(hashing_embedder(8), 2).scores(["a"])
    with pytest.raises(ValueError, match=r"expert_index must lie in \[0, 2\)"):
        Router(hashing_embedder(8), 2).fit(["a", "b"], [0, 2])


def test_mismatched_expert_width_is_a_clear_error():
    wide = Expert.from_torch("wide", lambda: nn.Linear(1, 3), lambda xs: torch.ones(len(xs), 1), ["a", "b"])
    fed = Federation([wide], Router.from_descriptions(hashing_embedder(8), ["anything"]))
    with pytest.raises(ValueError, match=r"expert 'wide' must return probabilities of shape \(n, 2\).*got \(1, 3\)"):
        fed.predict(["hello"])


def test_federation_example_end_to_end():
    """The three-model example (tiny BERT, scikit-learn pipeline, torch module) on the bundled corpus, tiny."""
    pytest.importorskip("transformers")
    from moekit.tabular.federation_demo import DOMAINS, run_federation_example

    r = run_federation_example(tiny=True, embedder="hashing")
    assert r["experts"] == {name: list(parts) for name, parts in DOMAINS.items()}
    for k in ("k1", "k2"):
        assert 0 <= r[k]["accuracy"] <= 1 and sum(r[k]["per_expert"].values()) == r[k]["loads"]
    one = r["one_verse"]
    assert one["loads"][one["routed_to"]] == 1 and sum(one["loads"].values()) == 1  # only the chosen expert loaded
