"""Embedders, document reading and chunking."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from moekit.retrieval import ChunkConfig, HashingEmbedder, chunk_text, embedder_from_spec, read_documents
from moekit.retrieval.docs import as_documents
from moekit.retrieval.embed import check_embeddings, embed_texts


def test_hashing_embedder_is_deterministic_unit_and_topical():
    e = HashingEmbedder(dim=128, seed=3)
    x = e(["the ship sailed the sea", "the ship sailed the sea", "a sword in battle", ""])
    assert x.shape == (4, 128) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:3], axis=1), 1.0, rtol=1e-5)
    assert np.all(x[3] == 0)  # no words: zero vector, not NaN
    assert np.array_equal(x[0], x[1])
    y = e(["ship on the sea"])[0]
    assert y @ x[0] > y @ x[2]
    assert np.array_equal(embedder_from_spec(e.spec)(["abc"]), e(["abc"]))


def test_embedder_spec_errors():
    with pytest.raises(ValueError, match="custom embedder"):
        embedder_from_spec("custom:my_fn")
    with pytest.raises(ValueError, match="dim"):
        HashingEmbedder(dim=1)
    with pytest.raises(ValueError, match="not one string"):
        HashingEmbedder()("a single string")


def test_check_embeddings_rejects_bad_input():
    with pytest.raises(ValueError, match="dimension 3, the index expects 4"):
        check_embeddings(np.ones((2, 3)), 4)
    with pytest.raises(ValueError, match="NaN"):
        check_embeddings(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        check_embeddings(np.ones((2, 2, 2)))
    assert check_embeddings(np.ones(5), 5).shape == (1, 5)
    with pytest.raises(ValueError, match="returned 1 rows for 2 texts"):
        embed_texts(lambda t: np.ones((1, 4)), ["a", "b"])


def test_chunk_text_packs_sentences_under_the_word_limit():
    text = "One two three. Four five six seven. " * 10 + "\n\n" + "word " * 25
    chunks = chunk_text(text, ChunkConfig(max_words=10))
    assert all(1 <= len(c.split()) <= 10 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # nothing lost, nothing repeated
    assert chunk_text("  \n ") == []
    over = chunk_text(" ".join(f"w{i}" for i in range(30)), ChunkConfig(max_words=10, overlap_words=3))
    assert len(over) >= 3 and over[1].split()[:3] == over[0].split()[-3:]
    with pytest.raises(ValueError, match="overlap_words"):
        ChunkConfig(max_words=5, overlap_words=5)


def test_read_documents_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text", encoding="utf-8")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"gamma"))
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.txt").write_text("   ", encoding="utf-8")
    docs = read_documents(tmp_path)
    assert [d.name for d in docs] == ["a.txt", "c.txt.gz", "sub/b.md"]
    assert docs[1].text == "gamma"


def test_read_documents_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "missing")
    with pytest.raises(ValueError, match="no text files"):
        read_documents(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        read_documents(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe broken")
    with pytest.raises(ValueError, match=r"bad\.txt.*not valid UTF-8"):
        read_documents(tmp_path)


def test_as_documents_rejects_duplicates_and_bad_types():
    with pytest.raises(ValueError, match="unique"):
        as_documents([("a", "x"), ("a", "y")])
    with pytest.raises(ValueError, match="must be a string"):
        as_documents([("a", 3)])
    assert [d.name for d in as_documents({"x": "1", "y": "2"})] == ["x", "y"]
