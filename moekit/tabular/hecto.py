"""Hecto: heterogeneous experts (GRU for sequential input, FFN for static input) behind one top-1 gate.

The task: which part of the Bible (law, history, poetry, prophets, gospels, epistles) a KJV verse comes from.
A verse is ``steps`` BPE tokens (left-padded, truncated), embedded and flattened to one row of width
``D = steps * embed_dim``. Each row goes through a ``moekit.MoELayer`` (switch router, top-1) whose experts are
an ``ExpertList`` of ``GRUExpert``s (read the row as a sequence of ``steps`` token vectors) and ``FFNExpert``s
(read it as one static vector), then a linear head. Baselines at (about) equal total parameters: all-FFN, all-GRU
(same expert sizes) and one dense GRU as large as all experts together.

``run_hecto_experiment(quick=True)`` returns accuracies, parameter counts and where the gate sends the verses
(share of GRU-routed verses per part and per verse length).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.experts.heterogeneous import FFNExpert, GRUExpert
from moekit.layer import MoELayer

MODELS = ("hecto", "all_ffn", "all_gru", "single_gru")
EXPERT_KINDS = ("gru", "ffn")


@dataclass(frozen=True)
class HectoConfig:
    """Data, model and training sizes of the Hecto experiment."""

    steps: int = 33  # vectors per row: a static bag-of-words slot + 32 tokens (left-padded / truncated)
    embed_dim: int = 16
    num_experts: int = 4  # Hecto: half GRU, half FFN
    gru_hidden: int = 32
    vocab_size: int = 1024
    train_per_part: int = 1500
    test_per_part: int = 300
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 3e-3
    residual: bool = False  # head(x + body(x)) instead of head(body(x))
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "embed_dim", "num_experts", "gru_hidden", "train_per_part", "test_per_part"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HectoConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HectoConfig.{name} must be an int >= 1, got {value!r}")
        if self.num_experts < 2:
            raise ValueError(f"HectoConfig.num_experts must be >= 2 (a GRU and an FFN expert), got {self.num_experts}")
        if not self.learning_rate > 0:
            raise ValueError(f"HectoConfig.learning_rate must be > 0, got {self.learning_rate}")

    @property
    def d_model(self) -> int:
        return self.steps * self.embed_dim


QUICK_CONFIG = HectoConfig(train_per_part=600, test_per_part=200, epochs=6)
TINY_CONFIG = HectoConfig(
    steps=8, embed_dim=4, gru_hidden=8, vocab_size=300, train_per_part=20, test_per_part=10, epochs=2, batch_size=32
)


# ---------------------------------------------------------------------------------------------- experts
def gru_params(d_model: int, steps: int, hidden: int) -> int:
    """Parameters of ``GRUExpert(d_model, steps, hidden)``: GRU(step_width, hidden) + Linear(hidden, d_model)."""
    step_width = d_model // steps
    return 3 * (step_width * hidden + hidden * hidden + 2 * hidden) + hidden * d_model + d_model


def ffn_params(d_model: int, d_ff: int, static_width: int | None = None) -> int:
    """Parameters of ``FFNExpert(d_model, d_ff)`` (SwiGLU, no biases), or of ``StaticFFNExpert`` when
    ``static_width`` is given."""
    if static_width is None:
        return 3 * d_model * d_ff
    return 3 * static_width * d_ff + static_width * d_model + d_model


def ffn_width_for(d_model: int, params: int, static_width: int | None = None) -> int:
    """The FFN width whose parameter count is closest to ``params``."""
    if static_width is None:
        return max(1, round(params / (3 * d_model)))
    return max(1, round((params - static_width * d_model - d_model) / (3 * static_width)))


class StaticFFNExpert(nn.Module):
    """An ``FFNExpert`` on the static part of the row (its first ``static_width`` features, the bag of words),
    projected back to ``d_model``: (n, d_model) -> (n, d_model). The FFN ignores token positions by design:
    on flattened positional embeddings it overfits (train 95%, test 28% on the quick verse task)."""

    def __init__(self, d_model: int, static_width: int, d_ff: int) -> None:
        super().__init__()
        if not 0 < static_width <= d_model:
            raise ValueError(f"static_width must be in [1, d_model={d_model}], got {static_width}")
        self.static_width = static_width
        self.ffn = FFNExpert(static_width, d_ff)
        self.out = nn.Linear(static_width, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ffn(x[:, : self.static_width]))  # (n, d_model)


def gru_width_for(d_model: int, steps: int, params: int) -> int:
    """The GRU hidden width whose ``GRUExpert`` parameter count is closest to ``params``."""
    h = 1
    while gru_params(d_model, steps, h + 1) <= params:
        h += 1
    return min((h, h + 1), key=lambda w: abs(gru_params(d_model, steps, w) - params))


def make_experts(kinds: Sequence[str], d_model: int, steps: int, gru_hidden: int, d_ff: int) -> list[nn.Module]:
    """One expert per entry of ``kinds``, each mapping (n, d_model) -> (n, d_model): ``"gru"`` (the token
    sequence, read in order) or ``"ffn"`` (the static slot: the first ``d_model // steps`` features)."""
    if len(kinds) == 0:
        raise ValueError("kinds is empty: give at least one expert kind ('gru' or 'ffn')")
    experts: list[nn.Module] = []
    for i, kind in enumerate(kinds):
        if kind == "gru":
            experts.append(GRUExpert(d_model, steps, gru_hidden))
        elif kind == "ffn":
            experts.append(StaticFFNExpert(d_model, d_model // steps, d_ff))
        else:
            raise ValueError(f"kinds[{i}] must be one of {EXPERT_KINDS}, got {kind!r}")
    return experts


# ---------------------------------------------------------------------------------------------- model
class HectoClassifier(nn.Module):
    """Token ids (n, steps - 1) -> class logits (n, n_classes), through a top-1 MoE of heterogeneous experts.

    Each row is ``steps`` vectors of ``embed_dim``: a static slot (the mean embedding of the verse's tokens, a
    bag of words) followed by the token embeddings; GRU experts read them in order, FFN experts as one vector.

    ``experts``: a list of modules mapping (n, steps * embed_dim) to the same width (``ExpertList`` checks the
    widths). ``dense``: instead of the MoE, one module applied to every row (the single-GRU baseline).
    ``residual``: the head reads ``x + body(x)`` (a transformer block's skip path) instead of ``body(x)``.
    """

    def __init__(
        self,
        vocab_size: int,
        n_classes: int,
        steps: int,
        embed_dim: int,
        experts: Sequence[nn.Module] | None = None,
        dense: nn.Module | None = None,
        pad_id: int = 0,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if (experts is None) == (dense is None):
            raise ValueError("give exactly one of experts (a list of modules) or dense (one module)")
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (a static slot and at least one token), got {steps}")
        self.steps, self.embed_dim, self.pad_id, self.residual = steps, embed_dim, pad_id, residual
        self.d_model = steps * embed_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.moe: MoELayer | None = None
        self.dense = dense
        if experts is not None:
            if not isinstance(experts, (list, tuple, nn.ModuleList)):
                raise TypeError(f"experts must be a list of nn.Module, got {type(experts).__name__}")
            if len(experts) == 0:
                raise ValueError("experts is an empty list: give at least one expert (e.g. a GRUExpert, an FFNExpert)")
            self.moe = MoELayer(
                self.d_model, None, num_experts=len(experts), k=1, router="switch", experts=list(experts)
            )
        self.head = nn.Linear(self.d_model, n_classes)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(n, steps - 1) int64 -> (logits (n, C), aux loss (scalar), chosen expert (n,) or None when dense)."""
        emb = self.embed(tokens)  # (n, steps - 1, e)
        real = (tokens != self.pad_id).unsqueeze(-1).to(emb.dtype)  # (n, steps - 1, 1)
        bag = (emb * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1.0)  # (n, 1, e)
        x = torch.cat([bag, emb], dim=1).reshape(tokens.shape[0], self.d_model)  # (n, D): static slot, then tokens
        if self.moe is None:
            return self.head(self._skip(x) + self.dense(x)), x.new_zeros(()), None
        out = self.moe(x)
        chosen = out.router_logits.argmax(dim=-1)  # (n,) top-1 of the switch router
        return self.head(self._skip(x) + out.output), out.aux_loss, chosen

    def _skip(self, x: Tensor) -> Tensor | float:
        return x if self.residual else 0.0


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_models(cfg: HectoConfig, vocab_size: int, n_classes: int) -> dict[str, HectoClassifier]:
    """Hecto and the three baselines; every MoE expert has about the parameters of one GRU expert."""
    D, E = cfg.d_model, cfg.num_experts
    per_expert = gru_params(D, cfg.steps, cfg.gru_hidden)
    d_ff = ffn_width_for(D, per_expert, cfg.embed_dim)
    n_gru = E // 2
    kinds = {
        "hecto": ["gru"] * n_gru + ["ffn"] * (E - n_gru),
        "all_ffn": ["ffn"] * E,
        "all_gru": ["gru"] * E,
    }
    models: dict[str, HectoClassifier] = {}
    for name, ks in kinds.items():
        experts = make_experts(ks, D, cfg.steps, cfg.gru_hidden, d_ff)
        models[name] = HectoClassifier(
            vocab_size, n_classes, cfg.steps, cfg.embed_dim, experts=experts, residual=cfg.residual
        )
    # one dense GRU with the parameters of all E experts (plus the router the MoEs have)
    target = E * per_expert + E * D
    hidden = gru_width_for(D, cfg.steps, target)
    dense = GRUExpert(D, cfg.steps, hidden)
    models["single_gru"] = HectoClassifier(
        vocab_size, n_classes, cfg.steps, cfg.embed_dim, dense=dense, residual=cfg.residual
    )
    return models


# ---------------------------------------------------------------------------------------------- data
@dataclass
class VerseData:
    tokens: Tensor  # (n, steps - 1) int64, left-padded
    labels: Tensor  # (n,) part index
    lengths: np.ndarray  # (n,) real token count before truncation
    refs: list[str]


def load_verse_task(cfg: HectoConfig) -> tuple[VerseData, VerseData, list[str], int]:
    """(train, test, part names, vocab size): balanced samples per part from held-out whole chapters."""
    from moekit.data import BPETokenizer, SplitConfig, TokenizerConfig, load_kjv

    corpus = load_kjv()
    train_c, test_c = corpus.split(SplitConfig(every=5, seed=cfg.seed))  # test verses share no chapter with train
    rng = random.Random(cfg.seed)
    parts = list(corpus.part_names)
    train_v = _balanced(train_c, parts, cfg.train_per_part, rng)
    test_v = _balanced(test_c, parts, cfg.test_per_part, rng)
    tok = BPETokenizer.train([v.text for v in train_v], TokenizerConfig(vocab_size=cfg.vocab_size))
    pad = tok.eot_id
    n_tok = cfg.steps - 1  # the first slot of a row is the static summary
    return _encode(train_v, parts, tok, n_tok, pad), _encode(test_v, parts, tok, n_tok, pad), parts, tok.vocab_size


def _balanced(corpus: Any, parts: list[str], per_part: int, rng: random.Random) -> list[Any]:
    by_part: dict[str, list[Any]] = {p: [] for p in parts}
    for v in corpus:
        by_part[v.part].append(v)
    out = []
    for p in parts:
        pool = by_part[p]
        out += rng.sample(pool, min(per_part, len(pool)))
    rng.shuffle(out)
    return out


def _encode(verses: list[Any], parts: list[str], tok: Any, steps: int, pad: int) -> VerseData:
    ids = tok.encode_batch([v.text for v in verses])
    tokens = torch.full((len(ids), steps), pad, dtype=torch.long)
    for i, seq in enumerate(ids):
        seq = seq[:steps]
        if seq:
            tokens[i, steps - len(seq) :] = torch.tensor(seq)  # left-pad: the GRU ends on real tokens
    labels = torch.tensor([parts.index(v.part) for v in verses])
    return VerseData(tokens, labels, np.array([len(s) for s in ids]), [v.ref for v in verses])


# ---------------------------------------------------------------------------------------------- training
def train_model(model: HectoClassifier, data: VerseData, cfg: HectoConfig, seed: int) -> float:
    """Adam on cross-entropy + the MoE's auxiliary loss; returns seconds spent."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.labels)
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            logits, aux, _ = model(data.tokens[idx])
            loss = nn.functional.cross_entropy(logits, data.labels[idx]) + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: HectoClassifier, data: VerseData, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """(predicted part (n,), chosen expert (n,) or None for the dense model)."""
    model.eval()
    preds, chosen = [], []
    for s in range(0, len(data.labels), batch_size):
        logits, _, c = model(data.tokens[s : s + batch_size])
        preds.append(logits.argmax(-1))
        if c is not None:
            chosen.append(c)
    return torch.cat(preds).numpy(), (torch.cat(chosen).numpy() if chosen else None)


def routing_report(
    chosen: np.ndarray, kinds: Sequence[str], data: VerseData, parts: Sequence[str], correct: np.ndarray
) -> dict[str, Any]:
    """Where the gate sends verses: per expert, per part and per verse-length quartile (real BPE tokens before
    truncation): the share routed to GRU experts and the accuracy of each routed group."""
    is_gru = np.array([kinds[e] == "gru" for e in chosen])
    labels = data.labels.numpy()
    per_part = {
        p: {"verses": int((labels == i).sum()), "gru_share": _mean(is_gru[labels == i])} for i, p in enumerate(parts)
    }
    per_length = {}
    edges = np.unique(np.quantile(data.lengths, [0.25, 0.5, 0.75]).round().astype(int))  # length quartiles
    bounds = [0, *edges.tolist(), int(data.lengths.max())]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        m = (data.lengths > lo) & (data.lengths <= hi)
        key = f"{lo + 1}-{hi} tokens"
        per_length[key] = {
            "verses": int(m.sum()),
            "gru_share": _mean(is_gru[m]),
            "accuracy_gru_routed": _mean(correct[m & is_gru]),
            "accuracy_ffn_routed": _mean(correct[m & ~is_gru]),
        }
    return {
        "expert_kinds": list(kinds),
        "expert_share": (np.bincount(chosen, minlength=len(kinds)) / len(chosen)).round(4).tolist(),
        "gru_share": _mean(is_gru),
        "accuracy_gru_routed": _mean(correct[is_gru]),
        "accuracy_ffn_routed": _mean(correct[~is_gru]),
        "per_part": per_part,
        "per_length_tokens": per_length,
    }


def _mean(a: np.ndarray) -> float | None:
    return round(float(np.mean(a)), 4) if len(a) else None


# ---------------------------------------------------------------------------------------------- experiment
def run_hecto_experiment(
    quick: bool = False, *, tiny: bool = False, config: HectoConfig | None = None, threads: int | None = 1
) -> dict[str, Any]:
    """Train Hecto, all-FFN, all-GRU and a single GRU on verse -> Bible part; accuracy, sizes and routing.

    Returns ``{"config", "parts", "models": {name: {accuracy, params, active_params, seconds, ...}},
    "routing": {name: report}, "summary": {...}}``; ``summary`` holds ``hecto_accuracy``, the baselines'
    accuracies, ``best_model``, ``hecto_gru_share`` and ``hecto_minus_best_baseline``.
    """
    cfg = config or (TINY_CONFIG if tiny else QUICK_CONFIG if quick else HectoConfig())
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(cfg)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: HectoConfig) -> dict[str, Any]:
    train, test, parts, vocab = load_verse_task(cfg)
    torch.manual_seed(cfg.seed)
    models = build_models(cfg, vocab, len(parts))
    E = cfg.num_experts
    results: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    for i, (name, model) in enumerate(models.items()):
        seconds = train_model(model, train, cfg, seed=cfg.seed + i)
        pred, chosen = predict(model, test)
        correct = pred == test.labels.numpy()
        total = count_params(model)
        if model.moe is not None:
            experts = model.moe.experts.experts
            expert_total = sum(count_params(e) for e in experts)
            active = total - expert_total + expert_total // E
            kinds = ["gru" if isinstance(e, GRUExpert) else "ffn" for e in experts]  # StaticFFNExpert: "ffn"
            routing[name] = routing_report(chosen, kinds, test, parts, correct)
        else:
            active = total
        results[name] = {
            "accuracy": round(float(correct.mean()), 4),
            "accuracy_per_part": {p: _mean(correct[test.labels.numpy() == j]) for j, p in enumerate(parts)},
            "params": total,
            "active_params": active,
            "train_seconds": round(seconds, 2),
        }
    baselines = {m: results[m]["accuracy"] for m in MODELS if m != "hecto"}
    summary = {
        "hecto_accuracy": results["hecto"]["accuracy"],
        **{f"{m}_accuracy": a for m, a in baselines.items()},
        "best_model": max(MODELS, key=lambda m: results[m]["accuracy"]),
        "hecto_minus_best_baseline": round(results["hecto"]["accuracy"] - max(baselines.values()), 4),
        "hecto_gru_share": routing["hecto"]["gru_share"],
        "params": {m: results[m]["params"] for m in MODELS},
        "chance": round(1 / len(parts), 4),
    }
    return {
        "config": asdict(cfg),
        "parts": parts,
        "train_verses": len(train.labels),
        "test_verses": len(test.labels),
        "models": results,
        "routing": routing,
        "summary": summary,
    }
