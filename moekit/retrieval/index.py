"""Library functions behind ``moekit index build DOCS --out DIR`` and ``moekit index query DIR "text"``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from moekit.retrieval.docs import ChunkConfig, read_documents
from moekit.retrieval.document_experts import DocumentExperts, ExpertsConfig, Hit
from moekit.retrieval.embed import EmbedFn, HashingEmbedder, MiniLMEmbedder
from moekit.retrieval.learned_router import RouterConfig
from moekit.retrieval.persistence import MANIFEST

EMBEDDERS = ("minilm", "hashing")


def make_embedder(name: str | EmbedFn) -> EmbedFn:
    """``"minilm"`` (offline all-MiniLM-L6-v2), ``"hashing"`` (256-dim hashed words) or a callable as is."""
    if callable(name):
        return name
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "hashing":
        return HashingEmbedder()
    raise ValueError(f"embedder must be one of {EMBEDDERS} or a callable, got {name!r}")


def build_index(
    docs_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    embedder: str | EmbedFn = "minilm",
    config: ExpertsConfig | None = None,
    max_words: int | None = None,
    learned_router: bool = False,
) -> DocumentExperts:
    """Read documents (a UTF-8 file or folder), build `DocumentExperts`, save it to ``out_dir``.

    Every input is read and checked before anything is written; ``out_dir`` must be new, empty, or hold an
    index (which is replaced atomically).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ValueError(f"{str(out)!r} exists and is not an empty folder or an index; refusing to write there")
    docs = read_documents(docs_path)
    config = config or ExpertsConfig()
    if max_words is not None:
        config = dataclasses.replace(config, chunk=ChunkConfig(max_words=max_words))
    if learned_router and config.router is None:
        config = dataclasses.replace(config, router=RouterConfig())
    experts = DocumentExperts.build(docs, make_embedder(embedder), config)
    experts.save(out)
    return experts


def query_index(
    index_dir: str | os.PathLike[str],
    text: str,
    k: int = 10,
    m: int | None = None,
    p: float | None = None,
    embedder: EmbedFn | None = None,
) -> list[Hit]:
    """Load the index at ``index_dir`` and return the top-``k`` chunks for ``text``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("query text must be a non-empty string")
    experts = DocumentExperts.load(index_dir, embedder=embedder)
    return experts.query(text, k=k, m=m, p=p)
