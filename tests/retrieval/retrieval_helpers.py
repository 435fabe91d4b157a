"""Data helpers of the retrieval tests: small topical documents and unit-vector blobs."""

from __future__ import annotations

import numpy as np

TOPICS = {
    "sea": "ship sail wave ocean harbour anchor tide storm sailor fish net boat",
    "war": "sword battle army shield spear king soldier chariot siege camp victory",
    "farm": "field seed harvest wheat barley vine sheep goat shepherd plough bread",
    "temple": "altar priest offering incense gold veil lamp sacrifice holy court",
}


def topical_docs(n_per_topic: int = 6, words: int = 40, seed: int = 0) -> dict[str, str]:
    """``n_per_topic`` documents per topic, each a few sentences of that topic's words."""
    rng = np.random.default_rng(seed)
    docs = {}
    for topic, vocab in TOPICS.items():
        w = vocab.split()
        for i in range(n_per_topic):
            sents = [" ".join(rng.choice(w, size=8)) + "." for _ in range(words // 8)]
            docs[f"{topic}/{i}.txt"] = " ".join(sents)
    return docs


def blobs(n_per: int = 60, centers: int = 6, dim: int = 16, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``centers`` random directions: (centers * n_per, dim) float32."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.repeat(c, n_per, axis=0) + spread * rng.standard_normal((centers * n_per, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
