"""Autoregressive sampling with the KV cache: temperature, nucleus (top-p), seeded, streaming."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from moekit.models.lm import MoETransformerLM


def next_token_probs(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None) -> Tensor:
    """The distribution ``sample_next_token`` draws from: logits (B, V) -> probabilities (B, V), float32.

    ``softmax(logits / temperature)``, kept to the ``top_k`` most likely tokens, then to the smallest set of
    most likely tokens whose probability reaches ``top_p`` (the most likely token is always kept), renormalised.
    ``temperature`` must be > 0 here (0 is greedy, no distribution).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p >= 1.0 and (top_k is None or top_k >= probs.shape[-1]):
        return probs
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True, stable=True)  # (B, V)
    keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # mass before this token is below top_p
    if top_k is not None:
        keep[:, top_k:] = False
    sorted_p = sorted_p * keep
    kept = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_p)  # (B, V) back in vocabulary order
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    top_k: int | None = None,
) -> Tensor:
    """Pick the next token from logits (B, V) -> (B,) int64.

    ``temperature == 0`` is greedy (argmax). Otherwise sample from ``next_token_probs``: temperature, then
    ``top_k`` (None: all tokens), then nucleus ``top_p``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_p, top_k)  # (B, V), zero outside the kept set
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: MoETransformerLM,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: Callable[[int], None] | None = None,
    top_k: int | None = None,
) -> Tensor:
    """Continue the prompt idx (1, L) by ``max_new_tokens`` tokens -> (1, L + max_new_tokens).

    The prompt is run once through the model to fill a KV cache, then one token per step. ``seed`` makes the
    sampling reproducible (its own ``torch.Generator``; the global RNG is untouched). ``stream(token_id)`` is
    called with each new token as soon as it is chosen. ``top_k`` keeps only the k most likely tokens (None:
    all). The model runs in eval mode (restored afterwards).
    """
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must be a (1, L) tensor with L >= 1, got {getattr(idx, 'shape', idx)}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"idx must be an integer tensor, got dtype {idx.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    max_len = model.config.max_seq_len
    if idx.shape[1] + max_new_tokens > max_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} plus the prompt length {idx.shape[1]} exceeds max_seq_len={max_len}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        idx = idx.long()
        out = idx
        if max_new_tokens == 0:
            return out
        cache = model.init_kv_cache(batch_size=1, max_len=idx.shape[1] + max_new_tokens)
        logits = model(idx, kv_cache=cache, start_pos=0).logits[:, -1]  # (1, V)
        pos = idx.shape[1]
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_p, generator, top_k)  # (1,)
            out = torch.cat([out, next_token[:, None]], dim=1)  # (1, pos + 1)
            if stream is not None:
                stream(int(next_token[0]))
            if step + 1 < max_new_tokens:
                logits = model(next_token[:, None], kv_cache=cache, start_pos=pos).logits[:, -1]  # (1, V)
                pos += 1
        return out
    finally:
        model.train(was_training)
