"""Generation: seeded sampling, greedy decoding, nucleus filtering, streaming."""

from __future__ import annotations

import pytest
import torch

from moekit.models import MoETransformerLM
from moekit.models.generate import sample_next_token


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread avoids OpenMP waits on a busy machine (much faster, same results)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def model(make_config) -> MoETransformerLM:
    torch.manual_seed(0)
    return MoETransformerLM(make_config(n_kv_heads=2))


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))


def test_seeded_sampling_is_deterministic_and_leaves_global_rng_alone(model, prompt):
    # The first forward of a process runs moekit.dispatch's one-off grouped_mm probe, which draws from the
    # global RNG; that is not generate's doing, so it runs before the state is taken.
    with torch.no_grad():
        model(prompt)
    rng = torch.get_rng_state()
    a = model.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=123)
    b = model.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=123)
    c = model.generate(prompt, 12, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.shape == (1, 17) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 12 tokens from 64: a collision is practically impossible


def test_greedy_equals_argmax_loop_without_cache(model, prompt):
    out = model.generate(prompt, 10, temperature=0.0)
    idx = prompt
    model.eval()
    with torch.no_grad():
        for _ in range(10):
            nxt = model(idx).logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
            idx = torch.cat([idx, nxt], dim=1)
    assert torch.equal(out, idx)


def test_stream_gets_every_new_token_in_order(model, prompt):
    seen: list[int] = []
    out = model.generate(prompt, 6, seed=0, stream=seen.append)
    assert seen == out[0, 5:].tolist()


def test_tiny_top_p_is_greedy(model, prompt):
    greedy = model.generate(prompt, 8, temperature=0.0)
    nucleus = model.generate(prompt, 8, temperature=1.0, top_p=1e-6, seed=3)
    assert torch.equal(greedy, nucleus)


def test_generate_restores_training_mode(model, prompt):
    model.train()
    model.generate(prompt, 2, seed=0)
    assert model.training


def test_sample_next_token_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(logits, 1.0, 0.7, g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut


def test_generate_argument_checks(model, prompt):
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 28)  # 5 + 28 > 32
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="idx"):
        model.generate(prompt.repeat(2, 1), 2)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_top_k_one_is_greedy_and_bad_top_k_is_refused(model, prompt):
    from moekit.models.generate import generate

    greedy = model.generate(prompt, 8, temperature=0.0)
    assert torch.equal(generate(model, prompt, 8, temperature=1.0, seed=5, top_k=1), greedy)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top_k"):
            generate(model, prompt, 2, top_k=bad)


def test_top_k_keeps_only_the_k_most_likely():
    from moekit.models.generate import next_token_probs

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    probs = next_token_probs(logits, 1.0, top_k=2)[0]
    e3, e2 = torch.exp(torch.tensor(3.0)), torch.exp(torch.tensor(2.0))
    assert torch.allclose(probs, torch.stack([torch.tensor(0.0), e3, torch.tensor(0.0), e2]) / (e3 + e2))
