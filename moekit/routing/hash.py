"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

Each token goes to experts fixed by its vocabulary id: no learned gate, no balance loss, no logits. Two
hashes are offered:

- ``vocab_size`` given: a fixed (vocab_size, k) table drawn once from a seeded ``torch.Generator`` (a random
  permutation of the experts per id, first k kept). Stored as a buffer, so it travels with the state dict.
- ``vocab_size=None``: a deterministic integer hash of (id, expert, seed); each id takes the k experts with
  the smallest hash values. Works for any id in [0, 2**63) with no table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import Router, Routing, empty_routing, router_dtype, slot_major_pairs
from moekit.routing.topk import check_router_sizes

MASK32 = 0xFFFFFFFF
MIX32 = 0x45D9F3B  # < 2**27, so (32-bit value) * MIX32 < 2**59 never overflows int64
TABLE_CHUNK = 65536  # rows drawn at once when building the table (bounds the temporary (rows, E) floats)


def mix32(h: Tensor) -> Tensor:
    """Avalanche hash of 32-bit values held in int64 (every output bit depends on every input bit)."""
    h = ((h >> 16) ^ h) * MIX32 & MASK32
    h = ((h >> 16) ^ h) * MIX32 & MASK32
    return (h >> 16) ^ h


def hash_scores(token_ids: Tensor, num_experts: int, seed: int) -> Tensor:
    """(T, E) int64 32-bit hash of every (id, expert) pair; an id takes the experts with the smallest values.

    token_ids (T,) int64 >= 0. The 64-bit id is folded to 32 bits first (low word ^ mixed high word).
    """
    ids = token_ids.long()
    id_key = mix32((ids & MASK32) ^ mix32(ids >> 32))  # (T,)
    experts = torch.arange(num_experts, dtype=torch.long, device=ids.device)
    salt = mix32((mix32(torch.full_like(experts, seed & MASK32)) + experts) & MASK32)  # (E,)
    return mix32(id_key.unsqueeze(1) ^ salt.unsqueeze(0))  # (T, E)


def random_hash_table(vocab_size: int, num_experts: int, k: int, seed: int) -> Tensor:
    """(vocab_size, k) int64: k distinct experts per id, a seeded random permutation's first k entries."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, vocab_size, TABLE_CHUNK):
        n = min(TABLE_CHUNK, vocab_size - start)
        rows.append(torch.rand(n, num_experts, generator=gen).argsort(dim=1)[:, :k])  # (n, k)
    return torch.cat(rows)


class HashRouter(Router):
    """Routes each token to ``k`` distinct experts fixed by its token id, each with weight ``1/k``.

    Args:
        d_model: input width (unused by the routing, checked for consistency with other routers).
        num_experts: E.
        k: experts per token (1 <= k <= E).
        vocab_size: build a fixed random table for ids in [0, vocab_size); None: integer hash, no table.
        seed: seed of the table or of the hash.
    """

    needs_token_ids = True

    def __init__(
        self, d_model: int, num_experts: int, k: int = 1, vocab_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        check_router_sizes(d_model, num_experts, k)
        if vocab_size is not None:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
                raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
            if vocab_size < 1:
                raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.vocab_size, self.seed = vocab_size, seed
        table = random_hash_table(vocab_size, num_experts, k, seed) if vocab_size is not None else None
        self.register_buffer("table", table)  # (V, K) int64, or None for the integer hash

    def experts_for(self, token_ids: Tensor) -> Tensor:
        """(T, K) int64 experts of each id, in slot order. token_ids (T,) int64, already validated."""
        if self.table is not None:
            return self.table[token_ids]
        scores = hash_scores(token_ids, self.num_experts, self.seed)  # (T, E)
        # Stable sort: equal hash values (rare) fall back to the lower expert index, as in the reference.
        return scores.argsort(dim=1, stable=True)[:, : self.k]

    def route(self, x: Tensor, *, token_ids: Tensor | None = None, seq_ids: Tensor | None = None) -> Routing:
        T = x.shape[0]
        ids = self._check_token_ids(token_ids, T)
        if T == 0:
            return empty_routing(self.num_experts, x.device, with_logits=False)
        top_idx = self.experts_for(ids.to(x.device))  # (T, K)
        top_w = torch.full(top_idx.shape, 1.0 / self.k, dtype=router_dtype(x), device=x.device)  # (T, K)
        token_idx, expert_idx, weight = slot_major_pairs(top_idx, top_w)
        return Routing(token_idx, expert_idx, weight, T, self.num_experts)

    def _check_token_ids(self, token_ids: Tensor | None, T: int) -> Tensor:
        name = type(self).__name__
        if token_ids is None:
            raise ValueError(f"token_ids are required by {name} (hash routing), got None")
        if not isinstance(token_ids, Tensor):
            raise ValueError(f"token_ids must be a ({T},) integer tensor, got {type(token_ids).__name__}")
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must have an integer dtype, got {token_ids.dtype}")
        if token_ids.shape != (T,):
            raise ValueError(f"token_ids must have shape ({T},) (one id per token of x), got {tuple(token_ids.shape)}")
        ids = token_ids.long()
        if T:
            if int(ids.min()) < 0:
                raise ValueError(f"token_ids must be >= 0, got min {int(ids.min())}")
            if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
                raise ValueError(f"token_ids must be < vocab_size={self.vocab_size}, got max {int(ids.max())}")
        return ids

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, vocab_size={self.vocab_size}, seed={self.seed}"
