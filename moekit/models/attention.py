"""Causal self-attention: rotary position embeddings, grouped-query attention, KV cache for decoding.

Shapes: ``B`` batch, ``L`` new positions, ``S`` key positions (``start_pos + L`` with a cache, else ``L``),
``H`` query heads, ``Hkv`` key/value heads, ``Dh`` head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------------ RoPE


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables for the given positions, each (L, Dh) float32 ("rotate half" layout, GPT-NeoX).

    Computed from the absolute positions, so a token gets bit-identical angles in a full forward and in
    incremental decoding.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim  # (Dh/2,)
    inv_freq = 1.0 / (theta**exponents)  # (Dh/2,)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, Dh)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + Dh/2}) by the position's angles. x (B, H, L, Dh), cos/sin (L, Dh)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, L, Dh/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, L, Dh)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------------ masks


def causal_mask(key_len: int, query_len: int, key_mask: Tensor | None, device: torch.device) -> Tensor:
    """Boolean attention mask, True = may attend: (B, 1, L, S), or (1, 1, L, S) without ``key_mask``.

    The L queries are the last L of the S key positions. ``key_mask`` (B, S) marks real keys (True) and
    padding (False). Each position may always attend to itself, so padded queries (whose logits are
    meaningless) still get a finite softmax; a real query never attends to a padded key.
    """
    q_pos = torch.arange(key_len - query_len, key_len, device=device)  # (L,)
    k_pos = torch.arange(key_len, device=device)  # (S,)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (L, S)
    if key_mask is None:
        return allowed[None, None]  # (1, 1, L, S)
    itself = k_pos[None, :] == q_pos[:, None]  # (L, S)
    return allowed[None, None] & (key_mask[:, None, None, :] | itself[None, None])  # (B, 1, L, S)


# ------------------------------------------------------------------------------------------------ KV cache


class LayerKVCache:
    """One layer's keys and values, preallocated: k and v (B, Hkv, max_len, Dh)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Write the new (B, Hkv, L, Dh) keys/values at ``start_pos``; return all of them (B, Hkv, S, Dh)."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for incremental decoding, plus which cached positions are real.

    Make one with ``MoETransformerLM.init_kv_cache(batch_size)``, then call the model with ``kv_cache=cache``
    and ``start_pos`` = the number of positions already in the cache (0 for the prompt).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.layers = [
            LayerKVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(n_layers)
        ]
        self.batch_size, self.max_len = batch_size, max_len
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.has_padding = False  # set once an attention_mask is given; then masks are built explicitly

    def update_key_mask(self, attention_mask: Tensor | None, start_pos: int, length: int) -> Tensor | None:
        """Record which of the new positions are real; return the key mask (B, start_pos + length), or None
        when no attention_mask was ever given (every key is real)."""
        end = start_pos + length
        if attention_mask is not None:
            self.has_padding = True
            self.key_mask[:, start_pos:end] = attention_mask
        else:
            self.key_mask[:, start_pos:end] = True
        return self.key_mask[:, :end] if self.has_padding else None


# ------------------------------------------------------------------------------------------------ attention


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE; grouped-query attention when ``n_kv_heads < n_heads``.

    Uses ``F.scaled_dot_product_attention``. x (B, L, D) -> (B, L, D).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        """x (B, L, D); cos/sin (L, Dh); attn_mask (B|1, 1, L, S) bool (True = attend), or None for plain
        causal attention of the L queries as the last L of the S keys."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)  # (B, Hkv, S, Dh)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, Dh)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, S, Dh)
        S = k.shape[2]
        is_causal = False
        if attn_mask is None:
            if S == L:
                is_causal = True
            elif L > 1:  # a chunk after cached positions: causal with an offset
                attn_mask = causal_mask(S, L, None, x.device)
            # L == 1 after cached positions: the single query attends to every key, no mask needed.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)  # (B, L, D)
        return self.out_proj(y)

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal init: ``std`` for q/k/v, ``out_std`` for the residual output projection."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
