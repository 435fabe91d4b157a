"""HashRouter: vectorised hash vs the per-token Python-int reference, determinism, table, input checks."""

import pytest
import torch

from moekit.layer import MoELayer
from moekit.reference.layer import reference_forward
from moekit.reference.routers_batch import reference_hash
from moekit.routing.hash import HashRouter
from moekit.routing.registry import build_router


def ids_and_x(T=20, vocab=50, D=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (T,), generator=gen), torch.randn(T, D, dtype=dtype, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vocab_size", [None, 50])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_matches_reference(dtype, vocab_size, k):
    router = HashRouter(8, 5, k, vocab_size=vocab_size, seed=7)
    ids, x = ids_and_x(dtype=dtype)
    got, want = router(x, token_ids=ids), reference_hash(router, x, ids)
    got.validate()
    # Same pairs in the same slot-major order, weight exactly 1/k in the input's precision.
    assert got.token_idx.tolist() == want.token_idx.tolist()
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    assert got.weight.dtype == dtype
    torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=0)
    assert got.logits is None and got.probs is None


def test_large_ids_use_all_64_bits():
    router = HashRouter(8, 16, k=2, seed=3)
    ids = torch.tensor([5, 5 + 2**32, 5 + 2**40, 2**62 + 11])  # same low word, different high words
    x = torch.zeros(4, 8)
    got, want = router(x, token_ids=ids), reference_hash(router, x, ids)
    assert got.expert_idx.tolist() == want.expert_idx.tolist()
    per_token = got.expert_idx.view(2, 4).t().tolist()  # (T, K)
    assert len({tuple(p) for p in per_token}) > 1  # the high word changes the experts


@pytest.mark.parametrize("vocab_size", [None, 100])
def test_deterministic_distinct_and_seeded(vocab_size):
    ids = torch.arange(100).repeat(2)  # every id twice
    x = torch.zeros(200, 8)
    a = HashRouter(8, 6, k=3, vocab_size=vocab_size, seed=1)(x, token_ids=ids)
    b = HashRouter(8, 6, k=3, vocab_size=vocab_size, seed=1)(x, token_ids=ids)
    c = HashRouter(8, 6, k=3, vocab_size=vocab_size, seed=2)(x, token_ids=ids)
    experts = a.expert_idx.view(3, 200).t()  # (T, K)
    assert torch.equal(experts[:100], experts[100:])  # same id, same experts
    assert all(len(set(row)) == 3 for row in experts.tolist())  # k distinct experts
    assert torch.equal(a.expert_idx, b.expert_idx)
    assert not torch.equal(a.expert_idx, c.expert_idx)


@pytest.mark.parametrize("vocab_size", [None, 4000])
def test_load_is_roughly_uniform(vocab_size):
    router = HashRouter(8, 4, k=1, vocab_size=vocab_size, seed=0)
    ids = torch.arange(4000)
    share = router(torch.zeros(4000, 8), token_ids=ids).tokens_per_expert().float() / 4000
    assert share.min() > 0.22 and share.max() < 0.28


def test_no_parameters_table_in_state_dict():
    router = HashRouter(8, 4, k=2, vocab_size=30, seed=5)
    assert list(router.parameters()) == []
    assert router.needs_token_ids
    assert router.state_dict()["table"].shape == (30, 2)
    other = HashRouter(8, 4, k=2, vocab_size=30, seed=6)
    other.load_state_dict(router.state_dict())
    assert torch.equal(other.table, router.table)
    assert "table" not in HashRouter(8, 4, k=2).state_dict()


def test_empty_batch():
    routing = HashRouter(8, 4, k=2)(torch.zeros(0, 8), token_ids=torch.zeros(0, dtype=torch.long))
    assert routing.num_pairs == 0 and routing.logits is None and routing.probs is None


def test_int32_ids_accepted():
    router = HashRouter(8, 4, k=2, vocab_size=10)
    ids = torch.tensor([1, 9, 3])
    a = router(torch.zeros(3, 8), token_ids=ids)
    b = router(torch.zeros(3, 8), token_ids=ids.int())
    assert torch.equal(a.expert_idx, b.expert_idx)


@pytest.mark.parametrize(
    "token_ids,match",
    [
        (None, "token_ids"),
        ([1, 2, 3], "token_ids"),
        (torch.tensor([1.0, 2.0, 3.0]), "token_ids.*integer"),
        (torch.tensor([True, False, True]), "token_ids.*integer"),
        (torch.tensor([1, 2]), r"token_ids.*shape \(3,\)"),
        (torch.tensor([[1, 2, 3]]), r"token_ids.*shape \(3,\)"),
        (torch.tensor([1, -2, 3]), "token_ids.*>= 0"),
        (torch.tensor([1, 2, 10]), "token_ids.*vocab_size=10"),
    ],
)
def test_bad_token_ids(token_ids, match):
    router = HashRouter(8, 4, k=2, vocab_size=10)
    with pytest.raises(ValueError, match=match):
        router(torch.zeros(3, 8), token_ids=token_ids)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(k=0), ValueError, "k"),
        (dict(k=5), ValueError, "k"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(vocab_size=2.5), TypeError, "vocab_size"),
        (dict(seed="0"), TypeError, "seed"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HashRouter(8, 4, **kwargs)


def test_registry_and_layer():
    router = build_router("hash", d_model=8, num_experts=4, k=2, vocab_size=100)
    assert isinstance(router, HashRouter) and router.k == 2
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2, router=router)
    x, ids = torch.randn(2, 5, 8), torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(
        layer(x, token_ids=ids).output,
        reference_forward(layer, x, token_ids=ids).output,
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="token_ids"):
        layer(x)
