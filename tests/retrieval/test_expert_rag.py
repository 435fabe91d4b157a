"""ExpertRAG on a tiny untrained LM: datastore, kNN distribution, mixing, gate, the three modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.data import TokenStream
from moekit.models import LMConfig, MoETransformerLM
from moekit.retrieval.expert_rag import (
    Datastore,
    ExpertRAG,
    GateConfig,
    collect_hidden,
    fit_gate,
    knn_distribution,
    knn_target_log_prob,
    mix_log_prob,
)
from moekit.retrieval.tiny_lm import TinyLMConfig, hidden_and_logits, train_tiny_lm

V = 40


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, k=2, max_seq_len=16)
    return MoETransformerLM(cfg).eval()


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(0)
    pattern = rng.integers(1, V, 50)
    return TokenStream.from_ids(np.tile(pattern, 20))  # repetitive text: retrieval should help


def test_final_hidden_state_feeds_the_lm_head(lm):
    idx = torch.randint(0, V, (2, 8))
    h, logits = hidden_and_logits(lm, idx)
    assert h.shape == (2, 8, 16)
    torch.testing.assert_close(lm.lm_head(h), logits)


def test_datastore_search_and_errors(lm, stream):
    store = Datastore.from_stream(lm, stream, max_tokens=400)
    assert len(store) == 400 and store.exact
    d2, vals = store.search(store.keys[:3], 4)
    assert d2.shape == (3, 4) and np.allclose(d2[:, 0], 0, atol=1e-4)
    assert vals[:, 0].tolist() == store.values[:3].tolist()
    with pytest.raises(ValueError, match=r"queries must be \(n, 16\)"):
        store.search(np.ones((2, 7), dtype=np.float32), 4)
    with pytest.raises(ValueError, match="datastore needs"):
        Datastore(np.zeros((0, 4)), np.zeros(0))


def test_knn_probabilities_and_mixing_agree():
    rng = np.random.default_rng(1)
    d2 = rng.random((5, 6)).astype(np.float32)
    vals = rng.integers(0, 4, (5, 6))
    targets = vals[:, 2]
    p = knn_distribution(torch.from_numpy(d2), torch.from_numpy(vals), 4, temperature=0.5)
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    lp = knn_target_log_prob(d2, vals, targets, 0.5)
    np.testing.assert_allclose(np.exp(lp), p[torch.arange(5), torch.from_numpy(targets)].numpy(), rtol=1e-5)
    assert np.isneginf(knn_target_log_prob(d2, vals, np.full(5, 99), 0.5)).all()
    a, b = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -float("inf")])
    want = torch.log(0.3 * b.exp() + 0.7 * a.exp())
    torch.testing.assert_close(mix_log_prob(a, b, 0.3), want)


def test_gate_budget_and_modes(lm, stream):
    store = Datastore.from_stream(lm, stream, max_tokens=600)
    h, y, lp = collect_hidden(lm, stream, max_tokens=300)
    d2, vals = store.search(h.numpy(), 8)
    lpk = torch.from_numpy(knn_target_log_prob(d2, vals, y.numpy(), 1.0)).float()
    gate = fit_gate(h, lp, lpk, GateConfig(epochs=3, budget=0.3))
    retrieve, lam = gate.decide(h)
    assert retrieve.float().mean() <= 0.3 + 1e-6 and ((lam > 0) & (lam < 1)).all()

    rag = ExpertRAG(lm, store, gate, k=8, temperature=1.0, lam=0.4)
    idx = stream.ids[:32].long().reshape(2, 16)
    never, used_n = rag(idx, "never")
    torch.testing.assert_close(never, lm(idx).logits.log_softmax(-1))
    always, used_a = rag(idx, "always")
    gated, used_g = rag(idx, "gated")
    assert not used_n.any() and used_a.all()
    torch.testing.assert_close(always.exp().sum(-1), torch.ones(2, 16))
    # Tokens the gate skips keep the LM distribution exactly; the others are mixed.
    torch.testing.assert_close(gated[~used_g], never[~used_g])
    h2, _ = hidden_and_logits(lm, idx)
    torch.testing.assert_close(used_g, gate.decide(h2.reshape(-1, 16))[0].reshape(2, 16))
    with pytest.raises(ValueError, match="mode"):
        rag(idx, "sometimes")


def test_retrieval_lowers_loss_on_repetitive_text(stream):
    cfg = TinyLMConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, block_size=16, batch_size=4, steps=5, warmup=1)
    model, losses = train_tiny_lm(stream, V, cfg)
    assert len(losses) == 5 and all(np.isfinite(losses))
    store = Datastore.from_stream(model, stream, max_tokens=800)
    h, y, lp = collect_hidden(model, stream, max_tokens=200)
    d2, vals = store.search(h.numpy(), 8)
    lpk = torch.from_numpy(knn_target_log_prob(d2, vals, y.numpy(), 1.0)).float()
    assert mix_log_prob(lp, lpk, 0.5).mean() > lp.mean()  # text seen before: the datastore knows it


@pytest.mark.slow
def test_tiny_experiment_reports_every_mode():
    from moekit.bench.retrieval import _experiment_summary
    from moekit.retrieval.experiments import run_expert_rag_experiment

    res = run_expert_rag_experiment(tiny=True)
    ppl, share = res["ppl"], res["retrieval_share"]
    assert set(ppl) == {"lm_alone", "always", "gated", "random_gate"}
    assert all(np.isfinite(v) and v > 1 for v in ppl.values())
    assert share["always"] == 1.0 and 0 <= share["gated"] <= 1
    assert abs(share["random_gate"] - share["gated"]) < 0.1  # the random baseline retrieves as often
    assert res["goal_met"] == (ppl["gated"] <= ppl["always"] and share["gated"] <= 0.5)
    summary = _experiment_summary({"expert_rag": res})["expert_rag"]
    assert summary["ppl_gated"] == ppl["gated"] and summary["gated_retrieval_share"] == share["gated"]
