"""A learned router over document experts: a small gate trained to send a query to the clusters holding its
nearest neighbours, probed in order until the router's probability mass reaches ``p``.

``logits = scale * (q + MLP(q)) @ centroids.T + bias``: a learned residual moves the query (d -> hidden -> d)
before it is scored against the centroids, with a learned temperature and per-cluster bias. At initialisation
(last MLP layer zero) this is exactly centroid routing with a softmax. Routing costs ``C * d + 2 * d * hidden``
multiply-adds per query, about what centroid routing costs (a free C-way output layer would add
``hidden * C`` and, in our runs, routed no better).

Training targets (``RouterConfig.targets``):
- ``"cluster"``: one-hot chunk -> its cluster (what the cluster assignment says);
- ``"knn"`` (default): the clusters of the chunk's ``knn_k`` exact nearest chunks (a histogram), i.e. where a
  query near this chunk must look to find its top-k. Inputs get Gaussian noise (then renormalised) so the gate
  sees query-like points, not only the stored vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS = ("cluster", "knn")


@dataclass(frozen=True)
class RouterConfig:
    """Gate size and training schedule."""

    hidden: int = 128
    targets: str = "knn"
    knn_k: int = 10
    train_sample: int = 20_000
    epochs: int = 6
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    noise: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.targets not in TARGETS:
            raise ValueError(f"RouterConfig.targets must be one of {TARGETS}, got {self.targets!r}")
        for name in ("hidden", "knn_k", "train_sample", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RouterConfig.{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0 or self.noise < 0 or self.weight_decay < 0:
            raise ValueError("RouterConfig.lr must be > 0, noise and weight_decay >= 0")


class LearnedRouter(nn.Module):
    """(n, d) unit query embeddings -> (n, C) cluster logits."""

    def __init__(self, centroids: Tensor, hidden: int = 128) -> None:
        super().__init__()
        C, d = centroids.shape
        self.dim, self.num_clusters, self.hidden = int(d), int(C), int(hidden)
        self.register_buffer("centroids", centroids.detach().float().clone())  # (C, d)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(20.0))))
        self.bias = nn.Parameter(torch.zeros(C))
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, q: Tensor) -> Tensor:
        """q (n, d) -> logits (n, C)."""
        moved = q + self.fc2(F.gelu(self.fc1(q)))  # (n, d)
        return self.log_scale.exp() * (moved @ self.centroids.T) + self.bias  # (n, C)

    def cost_per_query(self) -> int:
        """Multiply-adds to route one query."""
        return self.num_clusters * self.dim + 2 * self.dim * self.hidden

    @torch.no_grad()
    def probs(self, q: np.ndarray) -> np.ndarray:
        """(n, d) -> (n, C) float32 softmax probabilities."""
        return self(torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))).softmax(-1).numpy()


def router_targets(
    x: np.ndarray, labels: np.ndarray, num_clusters: int, config: RouterConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(s,) rows of ``x`` used for training and their (s, C) float32 target distributions."""
    rng = np.random.default_rng(config.seed)
    n = x.shape[0]
    rows = np.arange(n) if n <= config.train_sample else rng.choice(n, config.train_sample, replace=False)
    targets = np.zeros((len(rows), num_clusters), dtype=np.float32)  # (s, C)
    if config.targets == "cluster":
        targets[np.arange(len(rows)), labels[rows]] = 1.0
        return rows, targets
    k = min(config.knn_k, n)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (n, d)
    for s in range(0, len(rows), 2048):
        block = rows[s : s + 2048]
        nn_idx = (xt[torch.from_numpy(block)] @ xt.T).topk(k, dim=1).indices.numpy()  # (b, n) -> (b, k)
        np.add.at(targets, (np.arange(s, s + len(block))[:, None], labels[nn_idx]), 1.0 / k)
    return rows, targets


def train_router(
    x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, config: RouterConfig | None = None
) -> LearnedRouter:
    """Fit a `LearnedRouter` on stored chunk embeddings x (n, d) with cluster ``labels`` (n,)."""
    config = config or RouterConfig()
    C = centroids.shape[0]
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        router = LearnedRouter(torch.from_numpy(centroids), config.hidden)
    rows, targets = router_targets(x, labels, C, config)
    xs = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32))  # (s, d)
    ts = torch.from_numpy(targets)  # (s, C)
    opt = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, -(-len(rows) // config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    router.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(rows), generator=gen)
        for s in range(0, len(rows), config.batch_size):
            idx = perm[s : s + config.batch_size]
            q = xs[idx]
            if config.noise > 0:
                scale = config.noise * torch.rand(len(idx), 1, generator=gen)  # per-row noise level
                q = q + scale * torch.randn(q.shape, generator=gen) / q.shape[1] ** 0.5
                q = F.normalize(q, dim=1)
            loss = -(ts[idx] * router(q).log_softmax(-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    router.eval()
    return router


def probe_by_mass(probs: np.ndarray, p: float, max_probes: int) -> np.ndarray:
    """(n, C) probabilities -> (n, max_probes) cluster ids in decreasing probability, -1 after the first
    prefix whose mass reaches ``p`` (at least one probe per query)."""
    if not 0 < p <= 1:
        raise ValueError(f"p must lie in (0, 1], got {p!r}")
    P = max(1, min(int(max_probes), probs.shape[1]))
    top = _top_sorted(probs, P)  # (n, P)
    mass = np.take_along_axis(probs, top, axis=1).cumsum(axis=1)  # (n, P)
    count = np.minimum((mass < p).sum(axis=1) + 1, P)  # (n,)
    out = np.where(np.arange(P)[None, :] < count[:, None], top, -1)
    return out.astype(np.int64)


def probe_top_m(scores: np.ndarray, m: int) -> np.ndarray:
    """(n, C) scores -> (n, m) ids of the m highest, in decreasing score."""
    return _top_sorted(scores, max(1, min(int(m), scores.shape[1]))).astype(np.int64)


def _top_sorted(a: np.ndarray, k: int) -> np.ndarray:
    if k >= a.shape[1]:
        return np.argsort(-a, axis=1, kind="stable")
    part = np.argpartition(-a, k - 1, axis=1)[:, :k]  # (n, k) unordered
    order = np.argsort(-np.take_along_axis(a, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
