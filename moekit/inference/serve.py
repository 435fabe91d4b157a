"""``moekit generate``: a trained LM and its tokenizer from a trainer checkpoint, sampled and streamed, fully
resident or through the edge runtime under a memory budget.

Where things live (``moekit demo`` / ``moekit train`` layout)::

    OUT/tokenizer.json
    OUT/moe/checkpoints/latest, step_000120/{model.safetensors, state.json}
    OUT/moe/checkpoints/expert-store-step_000120-<sha>/   the edge runtime's store, built on first use

``--checkpoint`` may name OUT, a run folder (OUT/moe), a checkpoints root or one ``step_*`` folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.inference.budget import BudgetError, parse_budget

CHECKPOINTS = "checkpoints"
DEFAULT_NEW_TOKENS = 64
TOKENIZER_FILE = "tokenizer.json"
#: CLI spellings of the cache policies (``least-stale`` is ``least_stale``).
CACHE_CHOICES = ("lru", "lfu", "committee", "least-stale", "naive")
#: Calibration text for the committee's usage counts (KJV, Genesis 1; public domain). Decoded once, when the
#: expert store is built; the prompt is not used, so the committee does not depend on what is asked.
CALIBRATION_TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness. And God called the light Day, and the darkness he called Night. And the "
    "evening and the morning were the first day. And God said, Let there be a firmament in the midst of the "
    "waters, and let it divide the waters from the waters. And God made the firmament, and divided the waters "
    "which were under the firmament from the waters which were above the firmament: and it was so."
)


class GenerateError(ValueError):
    """Bad input to ``moekit generate``; ``param`` names the option at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenerateOptions:
    """What to generate and how (the CLI's flags)."""

    prompt: str
    max_new_tokens: int | None = None  # None: up to 64, as many as fit in the model's context
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int | None = None
    seed: int | None = 0
    memory_budget: str | None = None  # None: fully resident (unless an edge flag below is set: then 100%)
    cache: str = "lru"
    prefetch: bool = False
    storage_mbps: float | None = None
    int8: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise GenerateError("the prompt must be a non-empty string", "--prompt")
        n = self.max_new_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise GenerateError(f"must be an int >= 0, got {self.max_new_tokens!r}", "--max-new-tokens")
        if not _number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise GenerateError(f"must be a number >= 0 (0 = greedy), got {self.temperature!r}", "--temperature")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerateError(f"must be a number in (0, 1], got {self.top_p!r}", "--top-p")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise GenerateError(f"must be an int >= 1, got {self.top_k!r}", "--top-k")
        if self.cache not in CACHE_CHOICES and self.cache != "least_stale":
            raise GenerateError(f"must be one of {', '.join(CACHE_CHOICES)}, got {self.cache!r}", "--cache")
        if self.storage_mbps is not None and (not _number(self.storage_mbps) or not 0 < self.storage_mbps < math.inf):
            raise GenerateError(f"must be a number of MB/s > 0, got {self.storage_mbps!r}", "--storage-mbps")
        if self.cache == "naive" and self.prefetch:
            raise GenerateError("naive on-demand loading keeps nothing, so it cannot prefetch", "--prefetch")
        if self.memory_budget is not None:
            try:  # syntax only here; the minimum is checked once the store's sizes are known
                parse_budget(self.memory_budget, 10**18)
            except BudgetError as err:
                raise GenerateError(str(err), "--memory-budget") from None

    @property
    def edge(self) -> bool:
        """Whether the run goes through the edge runtime."""
        return (
            self.memory_budget is not None
            or self.prefetch
            or self.int8
            or self.storage_mbps is not None
            or self.cache != "lru"
        )

    @property
    def policy(self) -> str:
        return self.cache.replace("-", "_")


def _number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


# ------------------------------------------------------------------------------------------------ checkpoints


def find_checkpoint(path: str | Path) -> Path:
    """The ``step_*`` folder to load from ``path``: itself, the latest one of a checkpoints root, of
    ``path/checkpoints``, or of ``path/<run>/checkpoints`` (the MoE run when a demo folder holds several)."""
    from moekit.training.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint, resolve_checkpoint

    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{str(root)!r} is not a folder (give the checkpoint or output folder)")
    if (root / STATE_FILE).is_file() or latest_checkpoint(root) is not None:
        return resolve_checkpoint(root)
    if latest_checkpoint(root / CHECKPOINTS) is not None:
        return resolve_checkpoint(root / CHECKPOINTS)
    runs = sorted(p for p in root.iterdir() if p.is_dir() and latest_checkpoint(p / CHECKPOINTS) is not None)
    if len(runs) > 1:  # a demo or `moekit train` folder: the MoE model, not its dense baseline
        runs = [p for p in runs if p.name != "dense"]
    if len(runs) == 1:
        return resolve_checkpoint(runs[0] / CHECKPOINTS)
    if runs:
        names = ", ".join(str(p) for p in runs)
        raise CheckpointError(f"{str(root)!r} holds several runs ({names}); pass one of them as --checkpoint")
    return resolve_checkpoint(root)  # raises naming the folder (incomplete checkpoint, or none at all)


def find_tokenizer(ckpt: Path, doc: dict[str, Any]) -> Path:
    """``tokenizer.json`` of a checkpoint: in its folder or up to three folders above (where the trainer's data
    preparation saves it), else the ``data_config.tokenizer`` recorded with the run."""
    from moekit.training.checkpoint import CheckpointError

    for folder in [ckpt, *list(ckpt.parents)[:3]]:
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    extra = (doc.get("state") or {}).get("extra") or {}
    given = (extra.get("data_config") or {}).get("tokenizer")
    if given:
        path = Path(given)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        f"no {TOKENIZER_FILE} found for checkpoint {str(ckpt)!r} (looked in it and the three folders above)"
    )


@dataclass
class LoadedLM:
    """A checkpoint's model config and tokenizer, and its weights unless loaded with ``weights=False``."""

    config: Any  # LMConfig
    tokenizer: Any  # BPETokenizer
    checkpoint: Path
    step: int
    model_sha256: str
    model: Any = None  # MoETransformerLM
    moe_experts: dict[str, int] | None = None  # per-layer E after DynMoE changes, else None


def load_lm(path: str | Path, weights: bool = True) -> LoadedLM:
    """Model (config from ``state.json``, weights from safetensors, every file's sha256 checked) and tokenizer
    of the checkpoint that ``path`` names (see ``find_checkpoint``). ``weights=False`` reads no weights (the
    edge runtime takes them from its expert store)."""
    from moekit.data import BPETokenizer
    from moekit.models import LMConfig
    from moekit.training.checkpoint import MODEL_FILE, CheckpointError, read_checkpoint_state

    ckpt = find_checkpoint(path)
    doc = read_checkpoint_state(ckpt)
    cfg_dict = (doc.get("state") or {}).get("model_config")
    if not isinstance(cfg_dict, dict):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} records no model_config in its state.json")
    if MODEL_FILE not in doc["files"]:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} lists no {MODEL_FILE} in its state.json")
    try:
        config = LMConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has an invalid model_config: {err}") from err
    tok_path = find_tokenizer(ckpt, doc)
    tokenizer = BPETokenizer.load(tok_path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"tokenizer {str(tok_path)!r} has {tokenizer.vocab_size} ids, the model of {str(ckpt)!r} only "
            f"{config.vocab_size}: they do not belong together"
        )
    experts = (doc.get("state") or {}).get("moe_experts") or None
    loaded = LoadedLM(config, tokenizer, ckpt, int(doc["step"]), doc["files"][MODEL_FILE], moe_experts=experts)
    if weights:
        loaded.model = load_weights(loaded)
    return loaded


def load_weights(loaded: LoadedLM) -> Any:
    """The ``MoETransformerLM`` of ``loaded.checkpoint`` in eval mode (safetensors, sha256 checked)."""
    from moekit.training.checkpoint import load_lm_checkpoint

    # load_lm_checkpoint rebuilds per-layer E after DynMoE changes; its throwaway random init must not move
    # the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model, _ = load_lm_checkpoint(loaded.checkpoint)
    return model


# ------------------------------------------------------------------------------------------------ streaming


class TextStream:
    """Turns token ids into text pieces as they come: a byte-level token can end inside a UTF-8 character, so
    text is emitted only up to the last complete character."""

    def __init__(self, tokenizer: Any, write: Callable[[str], None]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.done = 0  # characters already written

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        self.write(text[self.done :])
        self.done = len(text)

    def flush(self) -> str:
        """Write what is left (an incomplete character as U+FFFD); returns the whole text."""
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.done:
            self.write(text[self.done :])
            self.done = len(text)
        return text


# ------------------------------------------------------------------------------------------------ running


@dataclass
class GenerateResult:
    """What ``run_generate`` produced."""

    prompt: str
    text: str  # the continuation only
    token_ids: list[int]  # the new tokens
    checkpoint: str
    seconds: float
    tokens_per_s: float
    edge: dict[str, Any] | None = None  # the edge runtime's summary (telemetry)
    store: str | None = None
    notes: list[str] = field(default_factory=list)


def store_dir_for(loaded: LoadedLM, int8: bool) -> Path:
    """Where the expert store of this checkpoint lives: next to it, named by its step and weights' sha256 (a
    retrained checkpoint of the same step gets a new store, never a stale one)."""
    name = f"expert-store-{loaded.checkpoint.name}-{loaded.model_sha256[:12]}{'-int8' if int8 else ''}"
    return loaded.checkpoint.parent / name


def open_edge(loaded: LoadedLM, options: GenerateOptions) -> tuple[Any, Path]:
    """An ``EdgeModel`` over this checkpoint's expert store. The store is built on first use (the full model is
    loaded once for that, with calibration usage for the committee); later runs read no full checkpoint."""
    from moekit.inference.runtime import EdgeModel, ensure_store

    if loaded.moe_experts and set(dict(loaded.moe_experts).values()) != {loaded.config.num_experts}:
        raise GenerateError(
            f"checkpoint {str(loaded.checkpoint)!r} has per-layer expert counts {dict(loaded.moe_experts)} changed by"
            f" DynMoE; the edge runtime needs every MoE layer at num_experts={loaded.config.num_experts}: run"
            " without --memory-budget",
            "--memory-budget",
        )
    store_dir = store_dir_for(loaded, options.int8)
    ids = loaded.tokenizer.encode(CALIBRATION_TEXT)[: loaded.config.max_seq_len]
    calib = torch.tensor([ids]) if len(ids) >= 2 else None
    store = ensure_store(
        store_dir,
        lambda: loaded.model if loaded.model is not None else load_weights(loaded),
        calibration_ids=calib,
        prompt_len=min(16, len(ids)),
        quantization="int8" if options.int8 else None,
    )
    try:
        edge = EdgeModel(
            store,
            memory_budget=options.memory_budget or "100%",
            cache=options.policy,
            prefetch=options.prefetch,
            storage_mbps=options.storage_mbps,
        )
    except BudgetError as err:
        raise GenerateError(str(err), "--memory-budget") from None
    return edge, store_dir


def run_generate(
    checkpoint: str | Path, options: GenerateOptions, write: Callable[[str], None] | None = None
) -> GenerateResult:
    """Load the checkpoint, generate ``options.max_new_tokens`` tokens after the prompt, stream the text to
    ``write`` as it is produced; through the edge runtime when a memory budget (or an edge flag) is given."""
    loaded = load_lm(checkpoint, weights=not options.edge)
    tok = loaded.tokenizer
    prompt_ids = tok.encode(options.prompt)
    if not prompt_ids:
        raise GenerateError("the prompt encodes to no tokens", "--prompt")
    max_len = loaded.config.max_seq_len
    room = max_len - len(prompt_ids)
    n_new = min(DEFAULT_NEW_TOKENS, max(room, 0)) if options.max_new_tokens is None else options.max_new_tokens
    if n_new > room:
        raise GenerateError(
            f"the prompt ({len(prompt_ids)} tokens) plus {n_new} new tokens exceeds the model's "
            f"max_seq_len={max_len}; ask for at most {max(room, 0)} new tokens",
            "--max-new-tokens" if room >= 1 else "--prompt",
        )
    stream = TextStream(tok, write or (lambda _s: None))
    idx = torch.tensor([prompt_ids])  # (1, P)
    kwargs = dict(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k, seed=options.seed)
    edge_summary, store_path = None, None
    start = time.perf_counter()
    if options.edge:
        edge, store_path = open_edge(loaded, options)
        try:
            start = time.perf_counter()  # the store build and the committee preload are setup
            out = edge.generate(idx, n_new, stream=stream, **kwargs)
            edge_summary = edge.summary()
        finally:
            edge.close()
    else:
        from moekit.models.generate import generate

        out = generate(loaded.model, idx, n_new, stream=stream, **kwargs)
    seconds = time.perf_counter() - start
    text = stream.flush()
    new = out[0, len(prompt_ids) :].tolist()
    return GenerateResult(
        prompt=options.prompt,
        text=text,
        token_ids=new,
        checkpoint=str(loaded.checkpoint),
        seconds=seconds,
        tokens_per_s=len(new) / seconds if seconds > 0 else math.nan,
        edge=edge_summary,
        store=None if store_path is None else str(store_path),
    )
