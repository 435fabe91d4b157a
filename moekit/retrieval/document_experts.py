"""MODE: document experts. Chunks of a corpus are embedded and clustered; each cluster is an "expert" that
owns its chunks. A query goes to a few experts and is answered by exact search inside them.

    experts = DocumentExperts.build(docs, embedder=MiniLMEmbedder())
    hits = experts.query("in the beginning", k=10)          # top-m clusters by cosine to centroids
    experts.fit_router()                                       # learned gate; then query(..., p=0.9)
    experts.add_documents({"new.txt": "..."}); experts.remove_documents(["old.txt"])
    experts.save("idx"); experts = DocumentExperts.load("idx")
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moekit.retrieval.cluster import (
    ClusterConfig,
    assign_nearest,
    centroids_of,
    cluster_embeddings,
    compact_labels,
    split_oversize,
)
from moekit.retrieval.docs import ChunkConfig, Document, as_documents, chunk_text
from moekit.retrieval.embed import EmbedFn, check_embeddings, embed_texts, embedder_from_spec, embedder_spec
from moekit.retrieval.learned_router import (
    LearnedRouter,
    RouterConfig,
    probe_by_mass,
    probe_top_m,
    train_router,
)
from moekit.retrieval.persistence import IndexFormatError, load_bundle, save_bundle
from moekit.retrieval.search import ClusterLayout, SearchResult, search_probed

KIND = "document_experts"


@dataclass(frozen=True)
class ExpertsConfig:
    """Chunking, clustering, default probing (``m`` clusters, or ``m = ceil(m_share * C)`` when None) and an
    optional learned router trained at build time."""

    chunk: ChunkConfig = ChunkConfig()
    cluster: ClusterConfig = ClusterConfig()
    m: int | None = None
    m_share: float = 0.08
    max_probes: int = 64
    router: RouterConfig | None = None

    def __post_init__(self) -> None:
        if self.m is not None and (isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1):
            raise ValueError(f"ExpertsConfig.m must be an int >= 1 or None, got {self.m!r}")
        if not 0 < self.m_share <= 1:
            raise ValueError(f"ExpertsConfig.m_share must lie in (0, 1], got {self.m_share!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertsConfig:
        d = dict(d)
        router = d.pop("router", None)
        return cls(
            chunk=ChunkConfig(**d.pop("chunk")),
            cluster=ClusterConfig(**d.pop("cluster")),
            router=RouterConfig(**router) if router is not None else None,
            **d,
        )


@dataclass(frozen=True)
class Hit:
    """One search result: the document, the chunk's index inside it, its text, its cosine to the query."""

    doc: str
    chunk: int
    text: str
    score: float
    row: int


class DocumentExperts:
    """A clustered chunk index with centroid or learned routing; see the module docstring.

    State (n chunks, C clusters, d dims): ``emb`` (n, d) unit rows, ``labels`` (n,), ``centroids`` (C, d),
    ``chunk_doc`` (n,) index into ``doc_names``, ``chunk_pos`` (n,) chunk index within its document, ``texts``
    (n,) chunk texts (empty strings when built from bare vectors).
    """

    def __init__(
        self,
        emb: np.ndarray,
        labels: np.ndarray,
        centroids: np.ndarray,
        doc_names: list[str],
        chunk_doc: np.ndarray,
        chunk_pos: np.ndarray,
        texts: list[str],
        config: ExpertsConfig,
        sizes: tuple[int, int],
        embedder: EmbedFn | None = None,
        spec: str | None = None,
        router: LearnedRouter | None = None,
    ) -> None:
        self.emb, self.labels, self.centroids = emb, labels, centroids
        self.doc_names, self.chunk_doc, self.chunk_pos, self.texts = doc_names, chunk_doc, chunk_pos, texts
        self.config, self.target_size, self.max_cluster_size = config, int(sizes[0]), int(sizes[1])
        self.embedder = embedder
        self.spec = spec if spec is not None else (embedder_spec(embedder) if embedder is not None else "none")
        self.router = router
        self._layout: ClusterLayout | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        docs: Iterable[Document] | Mapping[str, str],
        embedder: EmbedFn,
        config: ExpertsConfig | None = None,
    ) -> DocumentExperts:
        """Chunk, embed and cluster documents (and fit the router when ``config.router`` is set)."""
        config = config or ExpertsConfig()
        docs = as_documents(docs)
        names, chunk_doc, chunk_pos, texts = _chunk_all(docs, config.chunk, start=0)
        if not texts:
            raise ValueError("no text to index: the documents are empty (empty corpus)")
        emb = embed_texts(embedder, texts)
        return cls._from_parts(emb, names, chunk_doc, chunk_pos, texts, config, embedder)

    @classmethod
    def from_embeddings(
        cls, emb: np.ndarray, config: ExpertsConfig | None = None, texts: Sequence[str] | None = None
    ) -> DocumentExperts:
        """Index bare vectors (n, d): one document per row, named by its row number."""
        emb = check_embeddings(emb)
        if emb.shape[0] == 0:
            raise ValueError("no vectors to index (empty corpus)")
        n = emb.shape[0]
        texts = list(texts) if texts is not None else [""] * n
        if len(texts) != n:
            raise ValueError(f"texts has {len(texts)} entries for {n} vectors")
        names = [str(i) for i in range(n)]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return cls._from_parts(
            emb, names, np.arange(n), np.zeros(n, dtype=np.int64), texts, config or ExpertsConfig(), None
        )

    @classmethod
    def _from_parts(cls, emb, names, chunk_doc, chunk_pos, texts, config, embedder) -> DocumentExperts:
        clustering = cluster_embeddings(emb, config.cluster)
        self = cls(
            emb,
            clustering.labels,
            clustering.centroids,
            names,
            np.asarray(chunk_doc, dtype=np.int64),
            np.asarray(chunk_pos, dtype=np.int64),
            texts,
            config,
            config.cluster.sizes_for(emb.shape[0]),
            embedder,
        )
        self.noise_share = clustering.noise_share
        if config.router is not None:
            self.fit_router(config.router)
        return self

    # ------------------------------------------------------------------ sizes
    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    @property
    def num_chunks(self) -> int:
        return int(self.emb.shape[0])

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def num_documents(self) -> int:
        return len(self.doc_names)

    def cluster_sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_clusters)

    @property
    def default_m(self) -> int:
        if self.config.m is not None:
            return min(self.config.m, self.num_clusters)
        return max(1, min(self.num_clusters, math.ceil(self.config.m_share * self.num_clusters)))

    @property
    def layout(self) -> ClusterLayout:
        if self._layout is None:
            self._layout = ClusterLayout.build(self.emb, self.labels, self.num_clusters)
        return self._layout

    # ------------------------------------------------------------------ search
    def search(
        self,
        q: np.ndarray,
        k: int = 10,
        m: int | None = None,
        p: float | None = None,
        max_probes: int | None = None,
    ) -> SearchResult:
        """Top-``k`` chunks of query vectors q (nq, d) (normalised here).

        ``p`` given: probe clusters in decreasing learned-router probability until their mass reaches ``p``
        (at most ``max_probes``; needs `fit_router`). Else the top ``m`` clusters by cosine to the centroids
        (``m`` defaults to ``default_m``).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q = check_embeddings(q, self.dim, name="query embeddings")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        if p is not None:
            if self.router is None:
                raise ValueError("p needs a learned router: call fit_router() first (or use m)")
            probes = probe_by_mass(self.router.probs(q), float(p), max_probes or self.config.max_probes)
        else:
            m = self.default_m if m is None else m
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"m must be an int >= 1, got {m!r}")
            probes = probe_top_m(q @ self.centroids.T, m)  # (nq, m)
        return search_probed(self.layout, q, probes, k)

    def query(
        self, text: str | Sequence[str], k: int = 10, m: int | None = None, p: float | None = None
    ) -> list[Hit] | list[list[Hit]]:
        """Embed and search text(s); a list of hits for one string, a list of lists for several."""
        if self.embedder is None:
            raise ValueError("this index has no embedder; pass one to DocumentExperts.load or use search()")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        res = self.search(embed_texts(self.embedder, texts, self.dim), k=k, m=m, p=p)
        hits = [
            [
                Hit(
                    self.doc_names[self.chunk_doc[r]],
                    int(self.chunk_pos[r]),
                    self.texts[r],
                    float(s),
                    int(r),
                )
                for s, r in zip(res.scores[i], res.ids[i], strict=True)
                if r >= 0
            ]
            for i in range(len(texts))
        ]
        return hits[0] if single else hits

    # ------------------------------------------------------------------ learned router
    def fit_router(self, config: RouterConfig | None = None) -> LearnedRouter:
        """Train the learned gate on the stored chunks (see `moekit.retrieval.learned_router`)."""
        config = config or self.config.router or RouterConfig()
        self.config = dataclasses.replace(self.config, router=config)
        self.router = train_router(self.emb, self.labels, self.centroids, config)
        return self.router

    # ------------------------------------------------------------------ incremental updates
    def add_documents(self, docs: Iterable[Document] | Mapping[str, str], embeddings: np.ndarray | None = None) -> int:
        """Chunk, embed and insert documents (all or nothing); returns the number of chunks added.

        Each chunk joins its nearest cluster; touched clusters above ``max_cluster_size`` are split with
        KMeans; centroids are recomputed; a learned router is retrained. ``embeddings`` (one row per chunk)
        skips the embedder.
        """
        docs = as_documents(docs)
        clash = sorted(set(self.doc_names) & {d.name for d in docs})
        if clash:
            raise ValueError(f"documents already in the index: {clash[:5]}")
        names, chunk_doc, chunk_pos, texts = _chunk_all(docs, self.config.chunk, start=self.num_documents)
        if not texts:
            return 0
        if embeddings is None:
            if self.embedder is None:
                raise ValueError("this index has no embedder; pass embeddings= (one row per chunk)")
            new = embed_texts(self.embedder, texts, self.dim)
        else:
            new = check_embeddings(embeddings, self.dim, name="embeddings")
            if new.shape[0] != len(texts):
                raise ValueError(f"embeddings has {new.shape[0]} rows for {len(texts)} chunks")
            new = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
        new_labels = assign_nearest(new, self.centroids)
        self.emb = np.concatenate([self.emb, new])
        self.labels = np.concatenate([self.labels, new_labels])
        self.chunk_doc = np.concatenate([self.chunk_doc, chunk_doc])
        self.chunk_pos = np.concatenate([self.chunk_pos, chunk_pos])
        self.doc_names = self.doc_names + names
        self.texts = self.texts + texts
        self._after_change()
        return len(texts)

    def remove_documents(self, names: Iterable[str]) -> int:
        """Delete documents by name (all or nothing); returns the number of chunks removed."""
        names = list(dict.fromkeys(names))
        index = {n: i for i, n in enumerate(self.doc_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise KeyError(f"documents not in the index: {missing[:5]}")
        if len(names) == self.num_documents:
            raise ValueError("cannot remove every document: build a new index instead")
        gone = np.zeros(self.num_documents, dtype=bool)
        gone[[index[n] for n in names]] = True
        keep = ~gone[self.chunk_doc]  # (n,)
        new_doc_id = np.cumsum(~gone) - 1  # old doc index -> new
        removed = int((~keep).sum())
        self.emb, self.labels = self.emb[keep], self.labels[keep]
        self.chunk_doc, self.chunk_pos = new_doc_id[self.chunk_doc[keep]], self.chunk_pos[keep]
        self.texts = [t for t, kept in zip(self.texts, keep, strict=True) if kept]
        self.doc_names = [n for n, g in zip(self.doc_names, gone, strict=True) if not g]
        self._after_change()
        return removed

    def _after_change(self) -> None:
        """Split oversize clusters, drop empty ones, recompute centroids, refit the router if needed."""
        old_c = self.num_clusters
        had_empty = bool((np.bincount(self.labels, minlength=old_c) == 0).any())
        labels = split_oversize(
            self.emb, self.labels, self.target_size, self.max_cluster_size, self.config.cluster.seed
        )
        structure_changed = had_empty or int(labels.max()) + 1 != old_c
        self.labels, _ = compact_labels(labels)
        self.centroids = centroids_of(self.emb, self.labels, int(self.labels.max()) + 1)
        self._layout = None
        if self.router is not None:
            if structure_changed or self.router.num_clusters != self.num_clusters:
                self.router = train_router(self.emb, self.labels, self.centroids, self.config.router)
            else:
                self.router.centroids.copy_(torch.from_numpy(self.centroids))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index (safetensors + JSON, checksummed, atomic; see `moekit.retrieval.persistence`)."""
        tensors = {
            "emb": self.emb.astype(np.float32),
            "labels": self.labels.astype(np.int64),
            "centroids": self.centroids.astype(np.float32),
            "chunk_doc": self.chunk_doc.astype(np.int64),
            "chunk_pos": self.chunk_pos.astype(np.int64),
        }
        if self.router is not None:
            for name, t in self.router.state_dict().items():
                tensors[f"router.{name}"] = t.detach().cpu().numpy()
        meta = {
            "kind": KIND,
            "dim": self.dim,
            "num_chunks": self.num_chunks,
            "num_clusters": self.num_clusters,
            "embedder": self.spec,
            "config": self.config.to_dict(),
            "sizes": [self.target_size, self.max_cluster_size],
            "router_hidden": self.router.hidden if self.router is not None else None,
        }
        save_bundle(directory, tensors, {"doc_names": self.doc_names, "texts": self.texts}, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], embedder: EmbedFn | None = None) -> DocumentExperts:
        """Read an index written by `save`; ``embedder=None`` rebuilds the built-in embedder it was made with
        (a custom one must be passed). Raises `IndexFormatError` for a damaged or foreign folder."""
        tensors, records, meta = load_bundle(directory)
        try:
            if meta.get("kind") != KIND:
                raise IndexFormatError(f"{str(directory)!r} holds a {meta.get('kind')!r}, not a {KIND} index")
            config = ExpertsConfig.from_dict(meta["config"])
            self = cls(
                tensors["emb"],
                tensors["labels"],
                tensors["centroids"],
                list(records["doc_names"]),
                tensors["chunk_doc"],
                tensors["chunk_pos"],
                list(records["texts"]),
                config,
                tuple(meta["sizes"]),
                embedder,
                spec=meta["embedder"],
            )
            self._check_consistent(meta)
            if meta.get("router_hidden") is not None:
                state = {
                    k[len("router.") :]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("router.")
                }
                router = LearnedRouter(state["centroids"], int(meta["router_hidden"]))
                router.load_state_dict(state)
                router.eval()
                self.router = router
        except IndexFormatError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise IndexFormatError(f"index at {str(directory)!r} is inconsistent: {exc}") from exc
        if embedder is None and self.spec != "none":
            try:
                self.embedder = embedder_from_spec(self.spec)
            except ValueError:
                self.embedder = None  # custom embedder: search() works, query() asks for one
        return self

    def _check_consistent(self, meta: dict[str, Any]) -> None:
        n, C = self.emb.shape[0], self.centroids.shape[0]
        if self.emb.ndim != 2 or self.emb.shape[1] != meta["dim"] or n != meta["num_chunks"]:
            raise ValueError("embedding matrix does not match the manifest")
        if C != meta["num_clusters"] or self.centroids.shape[1] != self.emb.shape[1]:
            raise ValueError("centroids do not match the manifest")
        for name in ("labels", "chunk_doc", "chunk_pos"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has the wrong shape")
        if len(self.texts) != n or n == 0:
            raise ValueError("texts do not match the chunks")
        if self.labels.min() < 0 or self.labels.max() >= C:
            raise ValueError("cluster labels out of range")
        if self.chunk_doc.min() < 0 or self.chunk_doc.max() >= len(self.doc_names):
            raise ValueError("chunk document ids out of range")


def _chunk_all(
    docs: list[Document], config: ChunkConfig, start: int
) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(names of docs with text, (n,) doc index from ``start``, (n,) position in doc, (n,) chunk texts)."""
    names: list[str] = []
    chunk_doc: list[int] = []
    chunk_pos: list[int] = []
    texts: list[str] = []
    for doc in docs:
        chunks = chunk_text(doc.text, config)
        if not chunks:
            continue
        idx = start + len(names)
        names.append(doc.name)
        chunk_doc += [idx] * len(chunks)
        chunk_pos += list(range(len(chunks)))
        texts += chunks
    return names, np.asarray(chunk_doc, dtype=np.int64), np.asarray(chunk_pos, dtype=np.int64), texts
