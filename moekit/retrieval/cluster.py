"""Cluster unit-norm embeddings into document experts: HDBSCAN (noise to the nearest cluster, KMeans splits)
or KMeans.

HDBSCAN runs on a random sample of at most ``fit_sample`` points, PCA-reduced to ``pca_dim`` dimensions
(density estimates are poor in 384 dims); every point, noise included, then joins its nearest cluster by
cosine to the cluster centroids (computed in the full space). Clusters above ``max_cluster_size`` are split
with KMeans into pieces of about ``target_size``, followed by ``refine_iters`` rounds of nearest-centroid
reassignment so that each point sits in the cluster whose centroid is closest to it (what routing assumes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moekit.retrieval.embed import normalize_rows

METHODS = ("hdbscan", "kmeans")


@dataclass(frozen=True)
class ClusterConfig:
    """How to cluster. ``target_size=None`` means ``max(min_cluster_size, round(sqrt(n) / 2))`` points per
    cluster; ``max_cluster_size=None`` means ``2 * target_size``; ``n_clusters`` (KMeans) defaults to
    ``ceil(n / target_size)``."""

    method: str = "hdbscan"
    min_cluster_size: int = 5
    target_size: int | None = None
    max_cluster_size: int | None = None
    n_clusters: int | None = None
    fit_sample: int = 20_000
    pca_dim: int | None = 32
    refine_iters: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"ClusterConfig.method must be one of {METHODS}, got {self.method!r}")
        for name in ("min_cluster_size", "fit_sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"ClusterConfig.{name} must be an int >= 2, got {v!r}")
        for name in ("target_size", "max_cluster_size", "n_clusters", "pca_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ClusterConfig.{name} must be an int >= 1 or None, got {v!r}")
        if not isinstance(self.refine_iters, int) or self.refine_iters < 0:
            raise ValueError(f"ClusterConfig.refine_iters must be an int >= 0, got {self.refine_iters!r}")

    def sizes_for(self, n: int) -> tuple[int, int]:
        """(target_size, max_cluster_size) for ``n`` points."""
        target = self.target_size or max(self.min_cluster_size, round(math.sqrt(n) / 2))
        return target, max(self.max_cluster_size or 2 * target, target)


@dataclass(frozen=True)
class Clustering:
    """``labels`` (n,) int64 in [0, C); ``centroids`` (C, d) float32 unit rows; ``noise_share``: share of the
    HDBSCAN sample labelled noise (0 for KMeans)."""

    labels: np.ndarray
    centroids: np.ndarray
    noise_share: float = 0.0

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])


def cluster_embeddings(x: np.ndarray, config: ClusterConfig | None = None) -> Clustering:
    """Cluster (n, d) unit rows; every cluster non-empty, labels compact in [0, C)."""
    config = config or ClusterConfig()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot cluster an empty set of embeddings")
    rng = np.random.default_rng(config.seed)
    target, max_size = config.sizes_for(n)
    noise_share = 0.0
    if config.method == "kmeans" or n < 2 * config.min_cluster_size:
        c = config.n_clusters or max(1, math.ceil(n / target))
        centroids = _kmeans_centroids(x, min(c, n), config.seed, config.fit_sample * 4, rng)
    else:
        centroids, noise_share = _hdbscan_centroids(x, config, rng)
    labels = assign_nearest(x, centroids)
    labels, centroids = _split_and_refine(x, labels, target, max_size, config, rng)
    return Clustering(labels, centroids, noise_share)


def assign_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) index of the highest-cosine centroid of each row (blocked to bound memory)."""
    return _assign_with_scores(x, centroids)[0]


def centroids_of(x: np.ndarray, labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """(C, d) unit-norm mean of each cluster's rows (a zero row for an empty cluster)."""
    sums = np.zeros((num_clusters, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    return normalize_rows(sums.astype(np.float32))


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber labels to 0..C-1 in order of first use; returns (new labels, old id of each new cluster)."""
    used, inverse = np.unique(labels, return_inverse=True)
    return inverse.astype(np.int64), used


def split_cluster(x: np.ndarray, target: int, seed: int) -> np.ndarray:
    """KMeans of one oversize cluster's rows (m, d) into ``ceil(m / target)`` pieces; (m,) piece ids."""
    pieces = min(x.shape[0], max(2, math.ceil(x.shape[0] / target)))
    centroids = spherical_kmeans(x, pieces, seed=seed)
    return compact_labels(assign_nearest(x, centroids))[0]


def spherical_kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means on unit rows with cosine assignment; (k, d) unit centroids.

    Starts from ``k`` distinct random rows; an emptied cluster is re-seeded with the row farthest from its
    centroid. Plain numpy (BLAS), blocked, so it is fast for the sizes used here (sklearn's KMeans is several
    times slower on few cores).
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(n, size=k, replace=False)].copy()  # (k, d)
    for _ in range(iters):
        labels, best = _assign_with_scores(x, centroids)
        new = centroids_of(x, labels, k)
        empty = np.nonzero(np.bincount(labels, minlength=k) == 0)[0]
        if len(empty):
            far = np.argsort(best)[: len(empty)]  # rows worst served by their centroid
            new[empty] = x[far]
        if np.allclose(new, centroids, atol=1e-6):
            break
        centroids = new
    return centroids


# ------------------------------------------------------------------------------------------ internals
def _sample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= size else np.sort(rng.choice(n, size=size, replace=False))


def _kmeans_centroids(x: np.ndarray, c: int, seed: int, sample: int, rng: np.random.Generator) -> np.ndarray:
    xs = x[_sample(x.shape[0], max(sample, 40 * c), rng)]
    return spherical_kmeans(xs, min(c, xs.shape[0]), seed=seed)


def _assign_with_scores(x: np.ndarray, centroids: np.ndarray, block: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """(n,) nearest centroid and (n,) its cosine."""
    labels = np.empty(x.shape[0], dtype=np.int64)
    best = np.empty(x.shape[0], dtype=np.float32)
    for s in range(0, x.shape[0], block):
        sc = x[s : s + block] @ centroids.T  # (b, C)
        labels[s : s + block] = sc.argmax(axis=1)
        best[s : s + block] = sc[np.arange(sc.shape[0]), labels[s : s + block]]
    return labels, best


def _hdbscan_centroids(x: np.ndarray, config: ClusterConfig, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    from sklearn.cluster import HDBSCAN

    xs = x[_sample(x.shape[0], config.fit_sample, rng)]  # (s, d)
    z = xs
    if config.pca_dim is not None and xs.shape[1] > config.pca_dim and xs.shape[0] > config.pca_dim:
        z = _pca(xs, config.pca_dim)
    labels = HDBSCAN(min_cluster_size=config.min_cluster_size, copy=True).fit_predict(z)  # (s,), -1 = noise
    noise_share = float((labels < 0).mean())
    kept = labels >= 0
    if not kept.any():  # all noise: one cluster, the splitter does the rest
        return normalize_rows(xs.mean(axis=0, keepdims=True)), noise_share
    lab, _ = compact_labels(labels[kept])
    return centroids_of(xs[kept], lab, int(lab.max()) + 1), noise_share


def _pca(x: np.ndarray, dim: int) -> np.ndarray:
    """(s, d) -> (s, dim) projection on the top principal directions."""
    xc = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)  # vt (d, d)
    return xc @ vt[:dim].T


def _split_and_refine(
    x: np.ndarray,
    labels: np.ndarray,
    target: int,
    max_size: int,
    config: ClusterConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    for it in range(config.refine_iters + 1):
        labels = split_oversize(x, labels, target, max_size, config.seed + it)
        labels, _ = compact_labels(labels)
        centroids = centroids_of(x, labels, int(labels.max()) + 1)
        if it == config.refine_iters:
            break
        new = assign_nearest(x, centroids)
        if np.array_equal(new, labels):
            break
        labels = new
    labels, _ = compact_labels(labels)
    return labels, centroids_of(x, labels, int(labels.max()) + 1)


def split_oversize(x: np.ndarray, labels: np.ndarray, target: int, max_size: int, seed: int) -> np.ndarray:
    """Split every cluster above ``max_size`` (KMeans, repeated on pieces still too big; a cluster KMeans
    cannot split, e.g. duplicates, is cut into equal runs along its first principal direction)."""
    labels = labels.copy()
    for attempt in range(6):
        counts = np.bincount(labels)
        big = np.nonzero(counts > max_size)[0]
        if len(big) == 0:
            break
        next_id = int(labels.max()) + 1
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)])
        for c in big:
            members = order[starts[c] : starts[c + 1]]
            if attempt < 5:
                pieces = split_cluster(x[members], target, seed + attempt)
            else:
                pieces = _equal_runs(x[members], target)
            labels[members] = np.where(pieces == 0, c, next_id + pieces - 1)
            next_id += int(pieces.max())
    return labels


def _equal_runs(x: np.ndarray, target: int) -> np.ndarray:
    """(m,) piece ids: rows sorted along the first principal direction, cut into runs of ``target``."""
    xc = x - x.mean(axis=0, keepdims=True)
    direction = np.linalg.svd(xc, full_matrices=False)[2][0] if len(x) > 1 else np.zeros(x.shape[1])
    pieces = np.empty(len(x), dtype=np.int64)
    pieces[np.argsort(xc @ direction, kind="stable")] = np.arange(len(x)) // target
    return pieces
