"""A tiny MoE LM trained for a short time, for the ExpertRAG and RoMA experiments, and the hook that reads
its final hidden state (the input of the LM head, after the final RMSNorm)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.data import BatchConfig, BatchSampler, TokenStream
from moekit.models import LMConfig, MoETransformerLM


@dataclass(frozen=True)
class TinyLMConfig:
    """Model size and training schedule (AdamW, linear warmup then cosine to 10%, clipping at 1)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    num_experts: int = 4
    k: int = 2
    d_ff: int = 256
    block_size: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0

    def lm_config(self, vocab_size: int) -> LMConfig:
        return LMConfig(
            vocab_size=vocab_size,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            num_experts=self.num_experts,
            k=self.k,
            max_seq_len=self.block_size,
        )


def train_tiny_lm(stream: TokenStream, vocab_size: int, config: TinyLMConfig) -> tuple[MoETransformerLM, list[float]]:
    """Train a fresh `MoETransformerLM` on ``stream``; returns (model in eval mode, per-step losses)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MoETransformerLM(config.lm_config(vocab_size))
    sampler = BatchSampler(stream, BatchConfig(config.batch_size, config.block_size, config.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    losses: list[float] = []
    model.train()
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, config)
        batch = sampler.batch(step)
        out = model(batch.inputs, batch.targets)
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.after_optimizer_step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return model, losses


def _lr(step: int, config: TinyLMConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged); restores the old value.

    Tiny models are several times faster on one thread than on two (no OpenMP hand-offs)."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def capture_final_hidden(model: MoETransformerLM) -> Iterator[list[Tensor]]:
    """Inside the block, every forward appends its final hidden state (B, L, D) (output of ``model.norm``)."""
    store: list[Tensor] = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


@torch.no_grad()
def hidden_and_logits(model: MoETransformerLM, idx: Tensor) -> tuple[Tensor, Tensor]:
    """idx (B, L) -> final hidden states (B, L, D) and logits (B, L, V)."""
    with capture_final_hidden(model) as store:
        logits = model(idx).logits
    return store[-1], logits
