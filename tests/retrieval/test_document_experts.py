"""DocumentExperts: build, query, learned router, incremental add/remove."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from retrieval_helpers import blobs

from moekit.retrieval import ChunkConfig, ClusterConfig, DocumentExperts, ExpertsConfig, RouterConfig
from moekit.retrieval.learned_router import LearnedRouter

CFG = ExpertsConfig(chunk=ChunkConfig(max_words=16), cluster=ClusterConfig(min_cluster_size=4, target_size=8))
FAST_ROUTER = RouterConfig(hidden=32, epochs=3, batch_size=64)


@pytest.fixture
def experts(docs, embedder):
    return DocumentExperts.build(docs, embedder, CFG)


def test_build_and_query_finds_the_topic(experts, docs):
    assert experts.num_documents == len(docs)
    assert experts.num_chunks > len(docs) and experts.num_clusters > 1
    assert experts.cluster_sizes().sum() == experts.num_chunks
    hits = experts.query("anchor ship sailor storm boat", k=5, m=experts.num_clusters)
    assert len(hits) == 5 and all(h.doc.startswith("sea/") for h in hits)
    assert hits[0].score >= hits[-1].score and hits[0].text
    many = experts.query(["sword army", "wheat harvest"], k=3)
    assert len(many) == 2 and many[1][0].doc.startswith("farm/")


def test_all_clusters_equals_exact_search(experts):
    q = experts.emb[:7] + 0.05
    res = experts.search(q, k=5, m=experts.num_clusters)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.argsort(-(qn @ experts.emb.T), axis=1, kind="stable")[:, :5]
    assert (res.ids == exact).all()
    assert (res.scanned == experts.num_chunks).all()
    small = experts.search(q, k=5, m=1)
    assert (small.scanned < experts.num_chunks).all() and (small.probes == 1).all()


def test_bad_queries_give_clear_errors(experts):
    with pytest.raises(ValueError, match="dimension 5, the index expects 64"):
        experts.search(np.ones((1, 5)))
    with pytest.raises(ValueError, match="k must be"):
        experts.search(experts.emb[:1], k=0)
    with pytest.raises(ValueError, match="fit_router"):
        experts.search(experts.emb[:1], p=0.9)
    with pytest.raises(ValueError, match="empty corpus"):
        DocumentExperts.build({"a": "  ", "b": ""}, lambda t: np.ones((len(t), 4)), CFG)


def test_learned_router_starts_as_centroid_routing_and_probes_by_mass(experts):
    cents = torch.from_numpy(experts.centroids)
    fresh = LearnedRouter(cents, hidden=8)
    q = experts.emb[:20]
    assert (fresh.probs(q).argmax(1) == (q @ experts.centroids.T).argmax(1)).all()
    experts.fit_router(FAST_ROUTER)
    low = experts.search(q, k=3, p=0.3)
    high = experts.search(q, k=3, p=0.999)
    assert (low.probes >= 1).all() and (high.probes >= low.probes).all()
    assert high.scanned.mean() >= low.scanned.mean()
    hits = experts.query("altar priest incense", k=3, p=0.9)
    assert hits[0].doc.startswith("temple/")


def test_add_documents_is_searchable_and_splits_oversize(experts, embedder):
    before = experts.num_clusters
    text = "lamp oil wick flame light night watch " * 40
    added = experts.add_documents({"lamps.txt": text})
    assert added > 5 and experts.num_documents == 25
    assert experts.cluster_sizes().max() <= experts.max_cluster_size
    assert experts.num_clusters >= before
    hit = experts.query("lamp oil wick flame", k=1, m=2)[0]
    assert hit.doc == "lamps.txt"
    with pytest.raises(ValueError, match="already in the index"):
        experts.add_documents({"lamps.txt": "again"})
    with pytest.raises(ValueError, match="dimension"):
        experts.add_documents({"x.txt": "one two"}, embeddings=np.ones((1, 3)))
    assert experts.num_documents == 25  # failed adds changed nothing


def test_remove_documents(experts):
    n = experts.num_chunks
    sea = [f"sea/{i}.txt" for i in range(6)]
    removed = experts.remove_documents(sea)
    assert removed > 0 and experts.num_chunks == n - removed and experts.num_documents == 18
    hits = experts.query("ship sail wave ocean", k=10, m=experts.num_clusters)
    assert not any(h.doc.startswith("sea/") for h in hits)
    assert experts.cluster_sizes().min() > 0  # emptied experts are dropped
    with pytest.raises(KeyError, match="not in the index"):
        experts.remove_documents(["war/0.txt", "nope.txt"])
    assert experts.num_documents == 18  # all or nothing
    with pytest.raises(ValueError, match="every document"):
        experts.remove_documents(list(experts.doc_names))


def test_router_follows_structure_changes(experts):
    experts.fit_router(FAST_ROUTER)
    experts.add_documents({f"new{i}": "lamp oil wick flame light " * 30 for i in range(3)})
    assert experts.router.num_clusters == experts.num_clusters
    res = experts.search(experts.emb[-3:], k=1, p=0.9)
    assert (res.ids[:, 0] >= experts.num_chunks - 200).all()


def test_from_embeddings_vectors_only():
    x = blobs(n_per=30, centers=4)
    de = DocumentExperts.from_embeddings(x, ExpertsConfig(cluster=ClusterConfig(method="kmeans", target_size=10)))
    assert de.num_chunks == 120 and de.num_documents == 120
    res = de.search(x[:5], k=1, m=de.num_clusters)
    assert res.ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="no embedder"):
        de.query("text")
