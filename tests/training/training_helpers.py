"""Tiny models and synthetic data for fast trainer tests (importable from tests and subprocesses)."""

from __future__ import annotations

import torch

from moekit.data import TokenStream
from moekit.models import LMConfig, MoETransformerLM
from moekit.training.config import TrainConfig

VOCAB = 64
BLOCK = 16


def make_stream(n: int = 4000, seed: int = 0) -> TokenStream:
    """A learnable synthetic stream: a noisy repeating pattern over VOCAB ids."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 23 + (torch.arange(n) // 7) % 5
    noise = torch.randint(0, VOCAB, (n,), generator=g)
    ids = torch.where(torch.rand(n, generator=g) < 0.1, noise, base % VOCAB)
    return TokenStream.from_ids(ids)


def tiny_config(**kw) -> LMConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=4, k=2, max_seq_len=BLOCK)
    base.update(kw)
    return LMConfig(**base)


def tiny_model(seed: int = 0, **kw) -> MoETransformerLM:
    torch.manual_seed(seed)
    return MoETransformerLM(tiny_config(**kw))


def train_config(**kw) -> TrainConfig:
    base = dict(
        max_steps=6, batch_size=4, block_size=BLOCK, lr=3e-3, warmup_steps=2, eval_every=2, eval_batches=2,
        checkpoint_every=3, keep_last=3,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)
