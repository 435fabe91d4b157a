"""Clustering into experts, the probed exact search, and probing rules."""

from __future__ import annotations

import numpy as np
import pytest
from retrieval_helpers import blobs

from moekit.retrieval import (
    ClusterConfig,
    ClusterLayout,
    cluster_embeddings,
    probe_by_mass,
    search_probed,
    spherical_kmeans,
)
from moekit.retrieval.learned_router import probe_top_m


@pytest.mark.parametrize("method", ["hdbscan", "kmeans"])
def test_clusters_are_compact_nonempty_and_bounded(method):
    x = blobs(n_per=80, centers=5)
    cl = cluster_embeddings(x, ClusterConfig(method=method, min_cluster_size=5, target_size=20, seed=1))
    C = cl.num_clusters
    counts = np.bincount(cl.labels, minlength=C)
    assert cl.labels.min() == 0 and cl.labels.max() == C - 1 and (counts > 0).all()
    assert counts.max() <= 40  # max_cluster_size = 2 * target_size
    np.testing.assert_allclose(np.linalg.norm(cl.centroids, axis=1), 1.0, rtol=1e-5)
    # Refinement leaves (almost) every point in the cluster of its nearest centroid.
    nearest = (x @ cl.centroids.T).argmax(1)
    assert (nearest == cl.labels).mean() > 0.9


def test_hdbscan_noise_joins_nearest_cluster_and_blobs_stay_together():
    x = blobs(n_per=50, centers=4, spread=0.2)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((20, x.shape[1])).astype(np.float32)
    x = np.concatenate([x, noise / np.linalg.norm(noise, axis=1, keepdims=True)])
    cl = cluster_embeddings(x, ClusterConfig(min_cluster_size=10, target_size=100, seed=0))
    assert (cl.labels >= 0).all() and len(cl.labels) == len(x)
    for b in range(4):  # each blob lies in a single expert
        assert len(set(cl.labels[b * 50 : (b + 1) * 50])) == 1


def test_oversize_cluster_is_split():
    x = blobs(n_per=300, centers=1, spread=0.5)
    cl = cluster_embeddings(x, ClusterConfig(min_cluster_size=5, target_size=50, max_cluster_size=80))
    assert cl.num_clusters >= 4 and np.bincount(cl.labels).max() <= 80


def test_cluster_errors():
    with pytest.raises(ValueError, match="empty"):
        cluster_embeddings(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="method"):
        ClusterConfig(method="dbscan")
    with pytest.raises(ValueError, match="k must lie"):
        spherical_kmeans(blobs(2, 2), 10)


def _brute(x, labels, q, probes, k):
    out = []
    for i in range(len(q)):
        ids = np.nonzero(np.isin(labels, probes[i][probes[i] >= 0]))[0]
        out.append(ids[np.argsort(-(x[ids] @ q[i]), kind="stable")[:k]])
    return out


def test_search_probed_is_exact_inside_probed_clusters():
    rng = np.random.default_rng(0)
    x = blobs(n_per=40, centers=8, dim=12, spread=1.0)
    labels = rng.integers(0, 10, len(x))
    labels[labels == 3] = 4  # cluster 3 is empty
    layout = ClusterLayout.build(x, labels, 10)
    q = blobs(n_per=3, centers=5, dim=12, seed=5)
    probes = np.stack([rng.choice(10, 4, replace=False) for _ in range(len(q))])
    probes[0, 1:] = -1
    res = search_probed(layout, q, probes, k=7)
    for got, want in zip(res.ids, _brute(x, labels, q, probes, 7), strict=True):
        assert got[: len(want)].tolist() == want.tolist()
    sizes = np.bincount(labels, minlength=10)
    assert res.scanned[0] == sizes[probes[0, 0]]
    assert res.probes.tolist() == (probes >= 0).sum(1).tolist()
    assert np.all(np.diff(res.scores, axis=1) <= 1e-7)


def test_probing_all_clusters_is_exact_search_and_padding():
    x = blobs(n_per=3, centers=2, dim=8)  # 6 vectors, k = 10 > n: padded with -1 / -inf
    labels = np.array([0, 0, 0, 1, 1, 1])
    res = search_probed(ClusterLayout.build(x, labels, 2), x[:2], np.array([[0, 1], [1, 0]]), k=10)
    assert res.ids[0, 0] == 0 and res.ids[1, 0] == 1
    assert (res.ids[:, 6:] == -1).all() and np.isinf(res.scores[:, 6:]).all()
    assert sorted(res.ids[0, :6].tolist()) == list(range(6))


def test_probe_rules():
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]])
    out = probe_by_mass(probs, 0.8, max_probes=4)
    assert out.tolist() == [[0, 1, -1, -1], [0, -1, -1, -1]]
    assert probe_by_mass(probs, 1.0, max_probes=2).tolist() == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="p must lie"):
        probe_by_mass(probs, 0.0, 4)
    assert probe_top_m(np.array([[0.1, 0.9, 0.5]]), 2).tolist() == [[1, 2]]
