"""TabMoE: table question answering with functional experts picked by a learned router, trained by hard-EM.

Tables are random row / column samples of the bundled tabular data sets (values rounded to 2 decimals, rows
numbered from 1). Questions come from templates of varied wording for eight operations, in three families:

- aggregation: ``count`` (rows with a column above a value), ``sum``, ``average``;
- comparison: ``greater`` / ``less`` / ``equal`` (a row's value against a number), ``argmax`` (which row);
- lookup: ``lookup`` (a row's value).

Every operation is a functional expert: a parameter-free executor on the table, given the question's slots (the
column named in it, ``row N``, a number) by a deterministic slot parser that every system shares. The router (a
small bag-of-n-grams text encoder over the question with the slots masked) picks one expert, which executes.
The operation is never given in training: hard-EM treats it as latent. E-step: among the experts whose execution
matches the answer, take the one the router currently likes best; M-step: train the router on those picks.

Compared with an oracle router (the true operation) and a single generalist network (an MLP that reads the same
question encoding and slots plus the referenced column and regresses the answer). Accuracy per operation and on
held-out templates (wordings never seen in training).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

FAMILIES: dict[str, tuple[str, ...]] = {
    "aggregation": ("count", "sum", "average"),
    "comparison": ("greater", "less", "equal", "argmax"),
    "lookup": ("lookup",),
}
OPS: tuple[str, ...] = tuple(op for ops in FAMILIES.values() for op in ops)
FAMILY_OF: dict[str, str] = {op: fam for fam, ops in FAMILIES.items() for op in ops}
#: Operations whose answer is an integer (a count, 0/1, a row number): scored by rounding the prediction.
INTEGER_OPS = frozenset({"count", "greater", "less", "equal", "argmax"})
TABLE_SOURCES = ("wine", "diabetes", "breast_cancer")

# {col}: a column name, {row}: a row number, {val}: a number. The last HELD_OUT of each list are never trained on.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "count": (
        "how many rows have {col} above {val}?",
        "count the rows where {col} is more than {val}",
        "number of rows with {col} over {val}",
        "in how many rows does {col} exceed {val}?",
        "how many rows with {col} more than {val}?",
        "count rows where {col} exceeds {val}",
    ),
    "sum": (
        "what is the total {col}?",
        "sum of {col}",
        "add up the {col} of all rows",
        "what is the sum of the {col} column?",
        "give the total of {col}",
        "what is the sum of {col} over all rows?",
    ),
    "average": (
        "what is the average {col}?",
        "mean of {col}",
        "what is the mean {col} over all rows?",
        "average the {col} column",
        "give the mean of the {col} column",
        "what is the average of {col} over all rows?",
    ),
    "greater": (
        "is the {col} of row {row} greater than {val}?",
        "does row {row} have {col} above {val}?",
        "is row {row} {col} more than {val}?",
        "{col} of row {row} exceeds {val}?",
        "is the {col} in row {row} above {val}?",
        "does row {row} have a {col} greater than {val}?",
    ),
    "less": (
        "is the {col} of row {row} less than {val}?",
        "does row {row} have {col} below {val}?",
        "is row {row} {col} smaller than {val}?",
        "{col} of row {row} under {val}?",
        "is the {col} in row {row} below {val}?",
        "does row {row} have a {col} less than {val}?",
    ),
    "equal": (
        "is the {col} of row {row} equal to {val}?",
        "does row {row} have {col} exactly {val}?",
        "is row {row} {col} the same as {val}?",
        "{col} of row {row} equals {val}?",
        "is the {col} in row {row} exactly {val}?",
        "does row {row} have a {col} equal to {val}?",
    ),
    "argmax": (
        "which row has the highest {col}?",
        "which row has the largest {col}?",
        "row with the maximum {col}",
        "where is {col} the largest?",
        "which row has the maximum {col}?",
        "row with the highest {col}",
    ),
    "lookup": (
        "what is the {col} of row {row}?",
        "give the {col} in row {row}",
        "look up {col} for row {row}",
        "row {row} {col}?",
        "what is the {col} in row {row}?",
        "look up the {col} of row {row}",
    ),
}
HELD_OUT = 2


# ---------------------------------------------------------------------------------------------- tables, slots
@dataclass(frozen=True)
class Table:
    """A small numeric table: ``columns`` names, ``values`` (rows, columns); rows are numbered 1..rows."""

    columns: tuple[str, ...]
    values: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.columns.index(name)]


@dataclass(frozen=True)
class Slots:
    """What the parser read from a question: the column, a 0-based row, a number (None where absent)."""

    column: str | None = None
    row: int | None = None
    value: float | None = None


_ROW = re.compile(r"\brow (\d+)\b")
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def parse_question(question: str, table: Table) -> tuple[Slots, str]:
    """(slots, masked question): the longest column name in the question becomes ``<col>``, ``row N`` becomes
    ``row <row>`` and the remaining number ``<num>``; a row outside the table is ignored."""
    text = question.lower()
    column = None
    for name in sorted(table.columns, key=len, reverse=True):
        pattern = re.compile(rf"(?<![\w-]){re.escape(name.lower())}(?![\w])")  # whole words: "age" not in "average"
        if pattern.search(text):
            column = name
            text = pattern.sub(" <col> ", text)
            break
    row = None
    m = _ROW.search(text)
    if m:
        r = int(m.group(1)) - 1
        row = r if 0 <= r < len(table.values) else None
        text = _ROW.sub(" row <row> ", text)
    value = None
    m = _NUM.search(text)
    if m:
        value = float(m.group(0))
        text = _NUM.sub(" <num> ", text)
    return Slots(column, row, value), text


# ---------------------------------------------------------------------------------------------- experts
def _needs(*names: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable[[np.ndarray, Slots], float]) -> Callable[[Table, Slots], float | None]:
        def run(table: Table, s: Slots) -> float | None:
            if s.column is None or any(getattr(s, n) is None for n in names):
                return None  # the expert cannot execute without its slots
            return float(fn(table.column(s.column), s))

        run.__name__ = fn.__name__
        return run

    return wrap


@_needs("value")
def _count(c: np.ndarray, s: Slots) -> float:
    return (c > s.value).sum()


@_needs()
def _sum(c: np.ndarray, s: Slots) -> float:
    return round(float(c.sum()), 6)


@_needs()
def _average(c: np.ndarray, s: Slots) -> float:
    return round(float(c.mean()), 6)


@_needs("row", "value")
def _greater(c: np.ndarray, s: Slots) -> float:
    return c[s.row] > s.value


@_needs("row", "value")
def _less(c: np.ndarray, s: Slots) -> float:
    return c[s.row] < s.value


@_needs("row", "value")
def _equal(c: np.ndarray, s: Slots) -> float:
    return abs(c[s.row] - s.value) < 1e-9


@_needs()
def _argmax(c: np.ndarray, s: Slots) -> float:
    return int(np.argmax(c)) + 1  # rows are numbered from 1


@_needs("row")
def _lookup(c: np.ndarray, s: Slots) -> float:
    return c[s.row]


#: The functional experts, in ``OPS`` order: ``expert(table, slots) -> answer`` or None (missing slots).
EXPERTS: dict[str, Callable[[Table, Slots], float | None]] = {
    "count": _count,
    "sum": _sum,
    "average": _average,
    "greater": _greater,
    "less": _less,
    "equal": _equal,
    "argmax": _argmax,
    "lookup": _lookup,
}


def answers_match(pred: float | None, answer: float, op: str) -> bool:
    """The scoring rule every system shares: integer answers by rounding, others within 1% (or 0.01)."""
    if pred is None or not math.isfinite(pred):
        return False
    if op in INTEGER_OPS:
        return round(pred) == answer
    return abs(pred - answer) <= 0.01 * max(1.0, abs(answer))


def candidate_experts(table: Table, slots: Slots, answer: float, experts: Sequence[str] = OPS) -> list[bool]:
    """Which experts' executions reproduce ``answer`` exactly (the latent choices hard-EM picks from)."""
    out = []
    for op in experts:
        pred = EXPERTS[op](table, slots)
        out.append(pred is not None and abs(pred - answer) <= 1e-6 * max(1.0, abs(answer)))
    return out


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Example:
    table: Table
    question: str
    answer: float
    op: str  # the true operation: used only for scoring and by the oracle
    template: int  # index into TEMPLATES[op]
    held_out: bool
    slots: Slots = field(default_factory=Slots)
    masked: str = ""


def _source_tables(names: Sequence[str]) -> list[tuple[tuple[str, ...], np.ndarray]]:
    from moekit.tabular.datasets import load_dataset

    out = []
    for name in names:
        X = load_dataset(name).X
        X = X.loc[
            :, [c for c in X.columns if not any(ch.isdigit() for ch in str(c))]
        ]  # digits would clash with numbers
        out.append((tuple(str(c).replace("_", " ") for c in X.columns), X.to_numpy(dtype=float)))
    return out


def make_table(source: tuple[tuple[str, ...], np.ndarray], rng: random.Random) -> Table:
    """4-8 random rows and 3-4 random columns of a data set, values rounded to 2 decimals."""
    cols, data = source
    n_rows, n_cols = rng.randint(4, 8), rng.randint(3, min(4, len(cols)))
    rows = rng.sample(range(len(data)), n_rows)
    ci = rng.sample(range(len(cols)), n_cols)
    return Table(tuple(cols[c] for c in ci), np.round(data[np.ix_(rows, ci)], 2))


def make_example(table: Table, op: str, template: int, rng: random.Random) -> Example:
    col = rng.choice(table.columns)
    c = table.column(col)
    row = rng.randrange(len(c))
    if op == "equal" and rng.random() < 0.5:
        val = c[row]  # half of the equality questions are true
    elif op in ("greater", "less", "equal"):
        val = c[rng.randrange(len(c))] if rng.random() < 0.7 else round(c[row] + rng.uniform(-1, 1) * (c.std() + 1), 2)
    else:
        val = c[rng.randrange(len(c))]
    question = TEMPLATES[op][template].format(col=col, row=row + 1, val=_number(val))
    slots, masked = parse_question(question, table)
    answer = EXPERTS[op](table, slots)
    if answer is None:  # cannot happen for well-formed templates; guards template edits
        raise ValueError(f"template {TEMPLATES[op][template]!r} does not give {op} its slots")
    held = template >= len(TEMPLATES[op]) - HELD_OUT
    return Example(table, question, answer, op, template, held, slots, masked)


def _number(x: float) -> str:
    """2-decimal text without trailing zeros ("12.5", "3", "-0.04")."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def make_examples(
    n: int, held_out: bool, rng: random.Random, sources: Sequence[tuple[tuple[str, ...], np.ndarray]]
) -> list[Example]:
    """``n`` examples, operations balanced; templates from the trained part, or only the held-out ones."""
    out = []
    for i in range(n):
        op = OPS[i % len(OPS)]
        k = len(TEMPLATES[op])
        template = rng.randrange(k - HELD_OUT, k) if held_out else rng.randrange(k - HELD_OUT)
        out.append(make_example(make_table(rng.choice(sources), rng), op, template, rng))
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------- text encoder
class NgramVocab:
    """Unigram and bigram ids of masked questions; unseen n-grams are dropped (id 0 stands for none)."""

    def __init__(self, texts: Sequence[str]) -> None:
        grams = sorted({g for t in texts for g in self.ngrams(t)})
        self.index = {g: i + 1 for i, g in enumerate(grams)}

    @staticmethod
    def ngrams(text: str) -> list[str]:
        words = re.findall(r"<\w+>|[a-z]+", text.lower())
        return words + [f"{a} {b}" for a, b in zip(words[:-1], words[1:], strict=True)]

    def __len__(self) -> int:
        return len(self.index) + 1

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(flat ids, offsets) for ``nn.EmbeddingBag``."""
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids += [self.index[g] for g in self.ngrams(t) if g in self.index] or [0]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class QuestionRouter(nn.Module):
    """Bag of n-gram embeddings (mean) -> MLP -> one logit per expert."""

    def __init__(self, vocab_size: int, n_experts: int, dim: int = 32) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, n_experts))

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        return self.mlp(self.bag(ids, offsets))  # (n, E)


# ---------------------------------------------------------------------------------------------- TabMoE
class TabMoE:
    """Router over functional table experts, trained by hard-EM over the latent expert choice.

    ``experts``: names from ``EXPERTS`` (default all eight). ``fit(examples)`` uses only questions, tables and
    answers; ``predict(examples)`` routes each question to one expert and executes it.
    """

    def __init__(self, experts: Sequence[str] = OPS, dim: int = 32, epochs: int = 30, lr: float = 1e-2, seed: int = 0):
        if isinstance(experts, str) or not isinstance(experts, (list, tuple)):
            raise TypeError(f"experts must be a list of expert names from {OPS}, got {type(experts).__name__}")
        if len(experts) == 0:
            raise ValueError(f"experts is an empty list: give at least one expert name from {OPS}")
        unknown = [e for e in experts if e not in EXPERTS]
        if unknown:
            raise ValueError(f"unknown experts {unknown}; available: {OPS}")
        self.experts = tuple(experts)
        self.dim, self.epochs, self.lr, self.seed = dim, epochs, lr, seed
        self.em_history: list[float] = []  # per epoch: share of E-step picks that equal the true operation

    def fit(self, examples: Sequence[Example]) -> TabMoE:
        if not examples:
            raise ValueError("examples is empty")
        torch.manual_seed(self.seed)
        self.vocab = NgramVocab([e.masked for e in examples])
        self.router = QuestionRouter(len(self.vocab), len(self.experts), self.dim)
        cand = torch.tensor([candidate_experts(e.table, e.slots, e.answer, self.experts) for e in examples])
        keep = cand.any(dim=1)  # an example no expert reproduces teaches nothing
        ids, offsets = self.vocab.encode([e.masked for e in examples])
        truth = torch.tensor([self.experts.index(e.op) if e.op in self.experts else -1 for e in examples])
        opt = torch.optim.Adam(self.router.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        n = len(examples)
        for _ in range(self.epochs):
            with torch.no_grad():  # E-step: the consistent expert the router likes best
                logits = self.router(ids, offsets)
                target = logits.masked_fill(~cand, -math.inf).argmax(dim=1)
            self.em_history.append(round(float((target == truth)[keep].float().mean()), 4))
            order = torch.randperm(n, generator=gen)
            order = order[keep[order]]
            for s in range(0, len(order), 128):  # M-step: one pass of cross-entropy on the picks
                b = order[s : s + 128]
                bi, bo = self.vocab.encode([examples[i].masked for i in b.tolist()])
                loss = nn.functional.cross_entropy(self.router(bi, bo), target[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return self

    @torch.no_grad()
    def route(self, examples: Sequence[Example]) -> list[str]:
        """The expert each question is sent to."""
        ids, offsets = self.vocab.encode([e.masked for e in examples])
        return [self.experts[i] for i in self.router(ids, offsets).argmax(dim=1).tolist()]

    def predict(self, examples: Sequence[Example]) -> list[float | None]:
        return [EXPERTS[op](e.table, e.slots) for op, e in zip(self.route(examples), examples, strict=True)]


def oracle_predict(examples: Sequence[Example]) -> list[float | None]:
    """The true operation's expert on the parsed slots (the upper bound of any router)."""
    return [EXPERTS[e.op](e.table, e.slots) for e in examples]


# ---------------------------------------------------------------------------------------------- generalist
MAX_ROWS = 8


def _slog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def _features(examples: Sequence[Example]) -> tuple[Tensor, Tensor]:
    """(table features (n, 3 * MAX_ROWS + 4), signed-log answers (n,)) for the generalist."""
    rows = []
    for e in examples:
        c = e.table.column(e.slots.column) if e.slots.column is not None else np.zeros(0)
        vals, mask, onehot = np.zeros(MAX_ROWS), np.zeros(MAX_ROWS), np.zeros(MAX_ROWS)
        vals[: len(c)], mask[: len(c)] = c, 1.0
        if e.slots.row is not None:
            onehot[e.slots.row] = 1.0
        v = e.slots.value if e.slots.value is not None else 0.0
        rows.append(
            np.concatenate([vals, mask, onehot, [v, e.slots.value is not None, e.slots.row is not None, len(c)]])
        )
    x = torch.tensor(np.array(rows), dtype=torch.float32)
    x[:, :MAX_ROWS] = _slog(x[:, :MAX_ROWS])
    x[:, 3 * MAX_ROWS] = _slog(x[:, 3 * MAX_ROWS])
    y = _slog(torch.tensor([e.answer for e in examples], dtype=torch.float32))
    return x, y


class GeneralistNet(nn.Module):
    """One network for every question: question bag + table features -> MLP -> the answer (signed log)."""

    def __init__(self, vocab_size: int, n_table: int, dim: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.mlp = nn.Sequential(
            nn.Linear(dim + n_table, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, ids: Tensor, offsets: Tensor, table: Tensor) -> Tensor:
        return self.mlp(torch.cat([self.bag(ids, offsets), table], dim=1)).squeeze(1)


class Generalist:
    """The single-network baseline: sees the same question encoding and slots as TabMoE (plus the column)."""

    def __init__(self, epochs: int = 60, lr: float = 3e-3, seed: int = 0) -> None:
        self.epochs, self.lr, self.seed = epochs, lr, seed

    def fit(self, examples: Sequence[Example]) -> Generalist:
        torch.manual_seed(self.seed)
        self.vocab = NgramVocab([e.masked for e in examples])
        x, y = _features(examples)
        self.net = GeneralistNet(len(self.vocab), x.shape[1])
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            order = torch.randperm(len(examples), generator=gen)
            for s in range(0, len(order), 128):
                b = order[s : s + 128]
                bi, bo = self.vocab.encode([examples[i].masked for i in b.tolist()])
                loss = nn.functional.mse_loss(self.net(bi, bo, x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return self

    @torch.no_grad()
    def predict(self, examples: Sequence[Example]) -> list[float]:
        x, _ = _features(examples)
        ids, offsets = self.vocab.encode([e.masked for e in examples])
        t = self.net(ids, offsets, x)
        return (torch.sign(t) * torch.expm1(t.abs())).tolist()


# ---------------------------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class TabMoEConfig:
    n_train: int = 4000
    n_test: int = 1600  # per split: seen templates and held-out templates
    router_epochs: int = 30
    generalist_epochs: int = 60
    sources: tuple[str, ...] = TABLE_SOURCES
    seed: int = 0


QUICK_CONFIG = TabMoEConfig(n_train=2400, n_test=800, router_epochs=20, generalist_epochs=40)
TINY_CONFIG = TabMoEConfig(n_train=240, n_test=80, router_epochs=10, generalist_epochs=5, sources=("wine",))


def accuracy_report(examples: Sequence[Example], preds: Sequence[float | None]) -> dict[str, Any]:
    ok = np.array([answers_match(p, e.answer, e.op) for p, e in zip(preds, examples, strict=True)])
    ops = np.array([e.op for e in examples])
    return {
        "accuracy": round(float(ok.mean()), 4),
        "per_op": {op: round(float(ok[ops == op].mean()), 4) for op in OPS if (ops == op).any()},
        "per_family": {
            fam: round(float(ok[np.isin(ops, list(members))].mean()), 4)
            for fam, members in FAMILIES.items()
            if np.isin(ops, list(members)).any()
        },
    }


def run_tabmoe_experiment(
    quick: bool = False, *, tiny: bool = False, config: TabMoEConfig | None = None, threads: int | None = 1
) -> dict[str, Any]:
    """Train TabMoE (hard-EM router) and the generalist on generated tables; score them and the oracle.

    Returns ``{"config", "systems": {name: {"seen": report, "held_out": report}}, "routing", "em_history",
    "summary"}``; ``summary`` holds ``tabmoe_accuracy``, ``tabmoe_held_out_accuracy``, ``oracle_accuracy``,
    ``generalist_accuracy`` (and held-out), ``router_accuracy`` (routed to the true operation) and
    ``em_pick_accuracy`` (last E-step's picks equal to the true operation).
    """
    cfg = config or (TINY_CONFIG if tiny else QUICK_CONFIG if quick else TabMoEConfig())
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run(cfg)
    finally:
        torch.set_num_threads(old)


def _run(cfg: TabMoEConfig) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    sources = _source_tables(cfg.sources)
    train = make_examples(cfg.n_train, False, rng, sources)
    seen = make_examples(cfg.n_test, False, rng, sources)
    held = make_examples(cfg.n_test, True, rng, sources)
    moe = TabMoE(epochs=cfg.router_epochs, seed=cfg.seed).fit(train)
    gen = Generalist(epochs=cfg.generalist_epochs, seed=cfg.seed).fit(train)
    systems: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    for split, ex in (("seen", seen), ("held_out", held)):
        for name, preds in (
            ("tabmoe", moe.predict(ex)),
            ("oracle", oracle_predict(ex)),
            ("generalist", gen.predict(ex)),
        ):
            systems.setdefault(name, {})[split] = accuracy_report(ex, preds)
        routed = moe.route(ex)
        routing[split] = {
            "router_accuracy": round(float(np.mean([r == e.op for r, e in zip(routed, ex, strict=True)])), 4),
            "confusion": {
                op: {r: sum(1 for q, e in zip(routed, ex, strict=True) if e.op == op and q == r) for r in OPS}
                for op in OPS
            },
        }
    summary = {
        "tabmoe_accuracy": systems["tabmoe"]["seen"]["accuracy"],
        "tabmoe_held_out_accuracy": systems["tabmoe"]["held_out"]["accuracy"],
        "oracle_accuracy": systems["oracle"]["seen"]["accuracy"],
        "oracle_held_out_accuracy": systems["oracle"]["held_out"]["accuracy"],
        "generalist_accuracy": systems["generalist"]["seen"]["accuracy"],
        "generalist_held_out_accuracy": systems["generalist"]["held_out"]["accuracy"],
        "router_accuracy": routing["seen"]["router_accuracy"],
        "router_held_out_accuracy": routing["held_out"]["router_accuracy"],
        "em_pick_accuracy": moe.em_history[-1],
        "tabmoe_per_op": systems["tabmoe"]["seen"]["per_op"],
        "tabmoe_held_out_per_op": systems["tabmoe"]["held_out"]["per_op"],
    }
    return {
        "config": asdict(cfg),
        "ops": list(OPS),
        "families": {k: list(v) for k, v in FAMILIES.items()},
        "templates": {
            op: {"trained": list(t[:-HELD_OUT]), "held_out": list(t[-HELD_OUT:])} for op, t in TEMPLATES.items()
        },
        "examples": [
            {"question": e.question, "op": e.op, "answer": e.answer, "columns": list(e.table.columns)} for e in seen[:5]
        ],
        "systems": systems,
        "routing": routing,
        "em_history": moe.em_history,
        "summary": summary,
    }
