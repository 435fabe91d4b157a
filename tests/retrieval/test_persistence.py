"""Safe persistence: round trip, tampering, truncation, atomic replacement; build_index / query_index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moekit.retrieval import (
    ChunkConfig,
    ClusterConfig,
    DocumentExperts,
    ExpertsConfig,
    HashingEmbedder,
    IndexFormatError,
    RouterConfig,
    build_index,
    persistence,
    query_index,
)

CFG = ExpertsConfig(
    chunk=ChunkConfig(max_words=16),
    cluster=ClusterConfig(min_cluster_size=4, target_size=8),
    router=RouterConfig(hidden=16, epochs=2, batch_size=64),
)


@pytest.fixture
def saved(tmp_path, docs, embedder):
    experts = DocumentExperts.build(docs, embedder, CFG)
    experts.save(tmp_path / "idx")
    return experts, tmp_path / "idx"


def _file(directory, prefix):
    return next(p for p in directory.iterdir() if p.name.startswith(prefix))


def test_round_trip_is_identical(saved):
    experts, path = saved
    loaded = DocumentExperts.load(path)  # rebuilds the hashing embedder from its spec
    q = experts.emb[:9]
    for kw in ({"m": 2}, {"p": 0.9}):
        a, b = experts.search(q, k=4, **kw), loaded.search(q, k=4, **kw)
        assert np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores)
    assert loaded.doc_names == experts.doc_names and loaded.texts == experts.texts
    assert loaded.query("sword battle", k=2)[0].doc == experts.query("sword battle", k=2)[0].doc
    assert loaded.config == experts.config


def test_tampered_tensor_file_is_rejected(saved):
    _, path = saved
    f = _file(path, "tensors-")
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="sha256"):
        DocumentExperts.load(path)


def test_truncated_files_are_rejected(saved):
    _, path = saved
    f = _file(path, "records-")
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(IndexFormatError, match="truncated"):
        DocumentExperts.load(path)
    m = path / "manifest.json"
    m.write_text(m.read_text()[:40])
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        DocumentExperts.load(path)


def test_edited_manifest_fails_its_checksum(saved):
    _, path = saved
    m = path / "manifest.json"
    doc = json.loads(m.read_text())
    doc["meta"]["num_clusters"] += 1
    m.write_text(json.dumps(doc))
    with pytest.raises(IndexFormatError, match="checksum"):
        DocumentExperts.load(path)


def test_missing_or_foreign_folders(tmp_path):
    with pytest.raises(IndexFormatError, match="missing"):
        DocumentExperts.load(tmp_path)
    persistence.save_bundle(tmp_path / "other", {"a": np.zeros(2)}, {}, {"kind": "something_else"})
    with pytest.raises(IndexFormatError, match="not a document_experts index"):
        DocumentExperts.load(tmp_path / "other")


def test_resave_replaces_atomically_and_cleans_up(saved, monkeypatch):
    experts, path = saved
    experts.remove_documents(["sea/0.txt"])
    experts.save(path)
    assert sorted(p.name.split("-")[0] for p in path.iterdir()) == ["manifest.json", "records", "tensors"]
    assert DocumentExperts.load(path).num_documents == experts.num_documents
    # A crash before the manifest is renamed leaves the previous index readable.
    real = persistence.atomic_write_bytes

    def failing(p, data):
        if p.name == persistence.MANIFEST:
            raise OSError("disk full")
        real(p, data)

    monkeypatch.setattr(persistence, "atomic_write_bytes", failing)
    experts.remove_documents(["sea/1.txt"])
    with pytest.raises(OSError, match="disk full"):
        experts.save(path)
    monkeypatch.undo()
    assert DocumentExperts.load(path).num_documents == experts.num_documents + 1


def test_build_and_query_index(tmp_path, docs):
    src = tmp_path / "docs"
    for name, text in docs.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding="utf-8")
    out = tmp_path / "index"
    experts = build_index(src, out, embedder=HashingEmbedder(64), config=CFG)
    assert (out / "manifest.json").is_file() and experts.num_documents == len(docs)
    hits = query_index(out, "harvest wheat barley", k=3)
    assert len(hits) == 3 and hits[0].doc.startswith("farm/")
    with pytest.raises(ValueError, match="non-empty"):
        query_index(out, "  ")


def test_build_index_bad_input_writes_nothing(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "ok.txt").write_text("fine text", encoding="utf-8")
    (src / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    out = tmp_path / "index"
    with pytest.raises(ValueError, match="not valid UTF-8"):
        build_index(src, out, embedder="hashing")
    assert not out.exists()
    (src / "bad.txt").unlink()
    (src / "ok.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        build_index(src, out, embedder="hashing")
    assert not out.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    (src / "ok.txt").write_text("some words", encoding="utf-8")
    with pytest.raises(ValueError, match="refusing"):
        build_index(src, busy, embedder="hashing")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
