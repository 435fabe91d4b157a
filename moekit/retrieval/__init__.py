"""Retrieval: MODE document experts (clustered chunk index with centroid or learned routing), ExpertRAG
(gated kNN-LM retrieval inside the moekit LM) and RoMA (router-only manifold alignment of a pretrained MoE).

Heavy pieces (sentence-transformers, the LM experiments) are imported on first use.
"""

from moekit.retrieval.cluster import ClusterConfig, Clustering, cluster_embeddings, spherical_kmeans
from moekit.retrieval.docs import ChunkConfig, Document, chunk_text, read_documents
from moekit.retrieval.document_experts import DocumentExperts, ExpertsConfig, Hit
from moekit.retrieval.embed import HashingEmbedder, MiniLMEmbedder, embedder_from_spec
from moekit.retrieval.index import build_index, make_embedder, query_index
from moekit.retrieval.learned_router import LearnedRouter, RouterConfig, probe_by_mass, train_router
from moekit.retrieval.persistence import IndexFormatError, load_bundle, save_bundle
from moekit.retrieval.search import ClusterLayout, SearchResult, search_probed

__all__ = [
    "ChunkConfig",
    "ClusterConfig",
    "ClusterLayout",
    "Clustering",
    "Document",
    "DocumentExperts",
    "ExpertsConfig",
    "HashingEmbedder",
    "Hit",
    "IndexFormatError",
    "LearnedRouter",
    "MiniLMEmbedder",
    "RouterConfig",
    "SearchResult",
    "build_index",
    "chunk_text",
    "cluster_embeddings",
    "embedder_from_spec",
    "load_bundle",
    "make_embedder",
    "probe_by_mass",
    "query_index",
    "read_documents",
    "save_bundle",
    "search_probed",
    "spherical_kmeans",
    "train_router",
]
