"""Exact inner-product search restricted to probed clusters (the inner loop of `DocumentExperts`).

Vectors are stored cluster-contiguous (``order``, ``offsets``: cluster c owns rows ``order[offsets[c] :
offsets[c + 1]]``). A batch of queries is grouped by probed cluster, so each cluster costs one (q_c, d) x
(d, n_c) matrix product however many queries probe it; per-cluster top-k lists are merged per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SearchResult:
    """``scores`` (q, k) float32 cosine (-inf padded), ``ids`` (q, k) int64 row ids (-1 padded),
    ``scanned`` (q,) vectors scored per query, ``probes`` (q,) clusters probed per query."""

    scores: np.ndarray
    ids: np.ndarray
    scanned: np.ndarray
    probes: np.ndarray


@dataclass(frozen=True)
class ClusterLayout:
    """Cluster-contiguous view of (n, d) vectors: ``data`` rows sorted by cluster, ``row_ids`` their original
    ids, ``offsets`` (C + 1,) boundaries."""

    data: np.ndarray
    row_ids: np.ndarray
    offsets: np.ndarray

    @classmethod
    def build(cls, x: np.ndarray, labels: np.ndarray, num_clusters: int) -> ClusterLayout:
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_clusters)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(np.ascontiguousarray(x[order]), order.astype(np.int64), offsets)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def search_probed(layout: ClusterLayout, q: np.ndarray, probes: np.ndarray, k: int) -> SearchResult:
    """Top-``k`` rows by inner product among the probed clusters of each query.

    q (nq, d); probes (nq, P) cluster ids, -1 = no probe. Exact within the probed clusters. Pairs (query,
    probe) are sorted by cluster; per cluster one matrix product and one top-k; one scatter at the end.
    """
    nq, P = probes.shape
    valid = probes >= 0  # (nq, P)
    qi, slot = np.nonzero(valid)  # (pairs,)
    cl = probes[qi, slot]
    order = np.argsort(cl, kind="stable")
    qi, slot, cl = qi[order], slot[order], cl[order]
    bounds = np.flatnonzero(np.diff(cl)) + 1
    starts = [0, *bounds.tolist()] if len(cl) else []
    ends = [*bounds.tolist(), len(cl)] if len(cl) else []
    data = torch.from_numpy(layout.data)  # (n, d)
    q_pairs = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))[torch.from_numpy(qi)]  # (pairs, d)
    vals, rows = [], []
    for s, e in zip(starts, ends, strict=True):
        c = int(cl[s])
        lo, hi = int(layout.offsets[c]), int(layout.offsets[c + 1])
        kk = min(k, hi - lo)
        if kk == 0:
            vals.append(torch.full((e - s, k), -torch.inf))
            rows.append(torch.full((e - s, k), -1, dtype=torch.long))
            continue
        v, i = (q_pairs[s:e] @ data[lo:hi].T).topk(kk, dim=1)  # (q_c, n_c) -> (q_c, kk)
        i = i + lo
        if kk < k:
            v = F.pad(v, (0, k - kk), value=-torch.inf)
            i = F.pad(i, (0, k - kk), value=-1)
        vals.append(v)
        rows.append(i)
    cand_s = torch.full((nq, P, k), -torch.inf)  # (nq, P, k)
    cand_i = torch.full((nq, P, k), -1, dtype=torch.long)
    if vals:
        idx = (torch.from_numpy(qi), torch.from_numpy(slot))
        cand_s[idx] = torch.cat(vals)
        cand_i[idx] = torch.cat(rows)
    kk = min(k, P * k)
    top_s, j = cand_s.reshape(nq, -1).topk(kk, dim=1)  # sorted, descending
    pos = cand_i.reshape(nq, -1).gather(1, j)  # layout positions, -1 = none
    row_ids = torch.from_numpy(layout.row_ids)
    ids = torch.where(pos >= 0, row_ids[pos.clamp_min(0)], torch.full_like(pos, -1))
    scanned = np.where(valid, layout.sizes[np.maximum(probes, 0)], 0).sum(axis=1)
    return SearchResult(top_s.numpy(), ids.numpy(), scanned.astype(np.int64), valid.sum(axis=1).astype(np.int64))
