"""ExpertRAG: gated kNN-LM retrieval inside the moekit LM.

- `Datastore`: (context embedding -> next token) pairs from training text, the context embedding being the
  LM's final hidden state (kNN-LM, Khandelwal et al. 2020); searched with FAISS (exact L2 up to
  ``exact_max`` keys, IVF beyond).
- kNN distribution: ``p_knn(y) = sum_{j in kNN, v_j = y} softmax(-d_j / T)``.
- `RetrievalGate`: a small MLP on the hidden state with two heads: whether to consult the datastore for this
  token, and the mixing weight ``lam`` in ``p = lam * p_knn + (1 - lam) * p_lm``. Tokens it does not send
  to the datastore use ``p_lm`` and cost no search.
- `fit_gate`: trained on held-out tuning tokens (never on the datastore's own text): the mixing head
  maximises the mixed likelihood; the retrieve head is a gain-weighted classifier of "mixing helps this
  token"; its threshold is calibrated on the tuning tokens so that at most ``budget`` of them retrieve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.data import TokenStream, validation_batches
from moekit.models import MoETransformerLM
from moekit.retrieval.tiny_lm import hidden_and_logits


class Datastore:
    """keys (N, D) float32, values (N,) int64 next-token ids; ``search`` returns squared L2 distances."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, exact_max: int = 100_000, nprobe: int = 16) -> None:
        import faiss

        keys = np.ascontiguousarray(keys, dtype=np.float32)
        values = np.asarray(values, dtype=np.int64)
        if keys.ndim != 2 or values.shape != (keys.shape[0],) or keys.shape[0] == 0:
            raise ValueError(f"datastore needs keys (N, D) and values (N,), N > 0; got {keys.shape}, {values.shape}")
        self.keys, self.values, self.dim = keys, values, keys.shape[1]
        n = keys.shape[0]
        if n <= exact_max:
            self.index = faiss.IndexFlatL2(self.dim)
            self.exact = True
        else:
            nlist = int(np.sqrt(n))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, nlist)
            self.index.cp.min_points_per_centroid = 1
            rng = np.random.default_rng(0)
            self.index.train(keys[rng.choice(n, min(n, 32 * nlist), replace=False)])
            self.index.nprobe = nprobe
            self.exact = False
        self.index.add(keys)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def search(self, h: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """h (n, D) -> squared distances (n, k) float32 and neighbour values (n, k) int64."""
        h = np.ascontiguousarray(h, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.dim:
            raise ValueError(f"queries must be (n, {self.dim}), got {h.shape}")
        d2, idx = self.index.search(h, k)
        return d2, self.values[np.maximum(idx, 0)]

    @classmethod
    @torch.no_grad()
    def from_stream(
        cls, model: MoETransformerLM, stream: TokenStream, max_tokens: int | None = None, batch_size: int = 16
    ) -> Datastore:
        """Run the LM over ``stream`` in consecutive windows; each (hidden state, next token) is an entry."""
        h, y, _ = collect_hidden(model, stream, max_tokens, batch_size)
        return cls(h.numpy(), y.numpy())


@torch.no_grad()
def collect_hidden(
    model: MoETransformerLM, stream: TokenStream, max_tokens: int | None = None, batch_size: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """Over consecutive windows of ``stream``: hidden states (n, D), targets (n,), LM log p(target) (n,)."""
    L = model.config.max_seq_len
    hs, ys, lps = [], [], []
    seen = 0
    for batch in validation_batches(stream, batch_size, L):
        h, logits = hidden_and_logits(model, batch.inputs)  # (B, L, D), (B, L, V)
        lp = logits.float().log_softmax(-1).gather(-1, batch.targets[..., None]).squeeze(-1)  # (B, L)
        hs.append(h.reshape(-1, h.shape[-1]).float())
        ys.append(batch.targets.reshape(-1))
        lps.append(lp.reshape(-1))
        seen += batch.targets.numel()
        if max_tokens is not None and seen >= max_tokens:
            break
    h, y, lp = torch.cat(hs), torch.cat(ys), torch.cat(lps)
    if max_tokens is not None:
        h, y, lp = h[:max_tokens], y[:max_tokens], lp[:max_tokens]
    return h, y, lp


def knn_target_log_prob(d2: np.ndarray, vals: np.ndarray, targets: np.ndarray, temperature: float) -> np.ndarray:
    """log p_knn(target) (n,) from neighbour distances and values (n, k); -inf when no neighbour matches."""
    w = torch.from_numpy(-d2 / temperature).log_softmax(-1)  # (n, k)
    match = torch.from_numpy(vals == targets[:, None])
    return torch.where(match, w, torch.full_like(w, -torch.inf)).logsumexp(-1).numpy()


def knn_distribution(d2: Tensor, vals: Tensor, vocab_size: int, temperature: float) -> Tensor:
    """(n, k) distances and values -> (n, V) kNN next-token distribution."""
    w = (-d2 / temperature).softmax(-1)  # (n, k)
    return torch.zeros(d2.shape[0], vocab_size, dtype=w.dtype).scatter_add_(1, vals, w)


def mix_log_prob(lp_lm: Tensor, lp_knn: Tensor, lam: Tensor | float) -> Tensor:
    """log(lam * p_knn + (1 - lam) * p_lm), elementwise and stable."""
    lam = torch.as_tensor(lam, dtype=lp_lm.dtype).clamp(1e-6, 1 - 1e-6)
    return torch.logaddexp(lam.log() + lp_knn, torch.log1p(-lam) + lp_lm)


class RetrievalGate(nn.Module):
    """h (n, D) -> (retrieve logit (n,), lam (n,) in (0, 1))."""

    def __init__(self, d_model: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 2))
        self.register_buffer("threshold", torch.tensor(0.5))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(h)  # (n, 2)
        return out[:, 0], torch.sigmoid(out[:, 1])

    def decide(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(retrieve (n,) bool, lam (n,))."""
        r, lam = self(h)
        return torch.sigmoid(r) > self.threshold, lam


@dataclass(frozen=True)
class GateConfig:
    hidden: int = 64
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 1e-3
    batch_size: int = 1024
    budget: float = 0.45  # most retrieval share allowed on the tuning tokens (margin under 50%)
    seed: int = 0


def fit_gate(h: Tensor, lp_lm: Tensor, lp_knn: Tensor, config: GateConfig | None = None) -> RetrievalGate:
    """Train a `RetrievalGate` on tuning tokens: hidden states h (n, D), log p_lm and log p_knn (n,)."""
    config = config or GateConfig()
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        gate = RetrievalGate(h.shape[1], config.hidden)
    opt = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = h.shape[0]
    for stage in ("mix", "retrieve"):
        for _ in range(config.epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, config.batch_size):
                i = perm[s : s + config.batch_size]
                r, lam = gate(h[i])
                if stage == "mix":
                    loss = -mix_log_prob(lp_lm[i], lp_knn[i], lam).mean()
                else:
                    gain = (mix_log_prob(lp_lm[i], lp_knn[i], lam.detach()) - lp_lm[i]).clamp(-10, 10)
                    loss = (
                        gain.abs() * F.binary_cross_entropy_with_logits(r, (gain > 0).float(), reduction="none")
                    ).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        score = torch.sigmoid(gate(h)[0])
        cap = torch.quantile(score, 1 - config.budget) if config.budget < 1 else torch.tensor(0.0)
        gate.threshold.fill_(max(0.5, float(cap)))
    gate.eval()
    return gate


class ExpertRAG(nn.Module):
    """A moekit LM with a kNN datastore consulted per token when the gate says so.

    ``forward(idx, mode)`` returns next-token log-probabilities (B, L, V) and the (B, L) bool mask of tokens
    that searched the datastore. Modes: ``"never"`` (LM alone), ``"always"`` (every token, fixed ``lam``),
    ``"gated"`` (the gate decides and sets ``lam``).
    """

    def __init__(
        self,
        model: MoETransformerLM,
        datastore: Datastore,
        gate: RetrievalGate,
        k: int = 16,
        temperature: float = 1.0,
        lam: float = 0.25,
    ) -> None:
        super().__init__()
        self.model, self.datastore, self.gate = model, datastore, gate
        self.k, self.temperature, self.lam = k, float(temperature), float(lam)

    @torch.no_grad()
    def forward(self, idx: Tensor, mode: str = "gated") -> tuple[Tensor, Tensor]:
        if mode not in ("never", "always", "gated"):
            raise ValueError(f"mode must be 'never', 'always' or 'gated', got {mode!r}")
        h, logits = hidden_and_logits(self.model, idx)  # (B, L, D), (B, L, V)
        B, L, V = logits.shape
        lp = logits.float().log_softmax(-1).reshape(B * L, V)
        hf = h.reshape(B * L, -1).float()
        if mode == "never":
            return lp.reshape(B, L, V), torch.zeros(B, L, dtype=torch.bool)
        if mode == "always":
            use = torch.ones(B * L, dtype=torch.bool)
            lam = torch.full((B * L,), self.lam)
        else:
            use, lam = self.gate.decide(hf)
        rows = use.nonzero().squeeze(1)
        if rows.numel():
            d2, vals = self.datastore.search(hf[rows].numpy(), self.k)
            p_knn = knn_distribution(torch.from_numpy(d2), torch.from_numpy(vals), V, self.temperature)
            lp_knn = p_knn.clamp_min(1e-30).log()
            lp[rows] = mix_log_prob(lp[rows], lp_knn, lam[rows, None])
        return lp.reshape(B, L, V), use.reshape(B, L)
