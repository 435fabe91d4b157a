"""What do the experts specialise in? Route validation text through a trained MoE LM and count, per MoE
layer and expert, the tokens it receives, their categories (punctuation, digits, capitalised, stop words,
word-start vs continuation, ...) and the part of the Bible they come from.

Counts are over (token, expert) pairs in eval mode. A *lift* compares an expert with the whole layer: the
share of the expert's pairs that fall in a category divided by the share of all of the layer's pairs in it
(lift 2 = the expert sees that category twice as often as the layer overall; 1 = no preference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

UNKNOWN_PART = "unknown"


@dataclass
class LayerCounts:
    """Counts of one MoE layer. Shapes: ``token`` (E, V), ``category`` (E, C), ``part`` (E, P + 1)."""

    token: Tensor
    category: Tensor
    part: Tensor


@torch.no_grad()
def collect_counts(
    model: nn.Module,
    batches: Sequence[Any],
    category_of_token: Sequence[int],
    num_categories: int,
    num_parts: int,
) -> dict[str, LayerCounts]:
    """Run ``batches`` (with ``inputs`` and ``input_part_ids`` (B, L)) through ``model`` in eval mode and
    count routed pairs per layer. ``category_of_token`` (V,) maps token ids to category indices."""
    layers = list(model.moe_layers())
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to report on expert specialization")
    V = int(model.config.vocab_size)
    device = next(model.parameters()).device
    cat_lookup = torch.as_tensor(list(category_of_token), dtype=torch.long, device=device)  # (V,)
    if cat_lookup.numel() != V:
        raise ValueError(f"category_of_token has {cat_lookup.numel()} entries, the vocabulary {V}")
    counts = {
        name: LayerCounts(
            torch.zeros(layer.num_experts, V, dtype=torch.long),
            torch.zeros(layer.num_experts, num_categories, dtype=torch.long),
            torch.zeros(layer.num_experts, num_parts + 1, dtype=torch.long),
        )
        for name, layer in layers
    }
    current: dict[str, Tensor] = {}

    def make_hook(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: Any, routing: Any) -> None:
            ids, parts = current["ids"], current["parts"]  # (T,) each: every token is real (no mask)
            e = routing.expert_idx.cpu()
            t = routing.token_idx.cpu()
            c = counts[name]
            E = c.token.shape[0]
            c.token += torch.bincount(e * V + ids[t], minlength=E * V).view(E, V)
            C = c.category.shape[1]
            c.category += torch.bincount(e * C + cat_lookup.cpu()[ids[t]], minlength=E * C).view(E, C)
            P1 = c.part.shape[1]
            c.part += torch.bincount(e * P1 + parts[t], minlength=E * P1).view(E, P1)

        return hook

    handles = [layer.router.register_forward_hook(make_hook(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = batch.inputs
            parts = batch.input_part_ids.reshape(-1).clone()  # (T,)
            parts[parts < 0] = num_parts  # unknown origin -> the last column
            current["ids"] = inputs.reshape(-1).cpu()
            current["parts"] = parts.cpu()
            model(inputs.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def _shares(row: Tensor) -> list[float]:
    total = float(row.sum())
    return [float(v) / total if total else 0.0 for v in row]


def _lifts(expert_share: list[float], layer_share: list[float]) -> list[float | None]:
    return [e / g if g > 0 else None for e, g in zip(expert_share, layer_share, strict=True)]


def specialization_report(
    counts: dict[str, LayerCounts],
    pieces: Sequence[str],
    category_names: Sequence[str],
    part_names: Sequence[str],
    top_tokens: int = 8,
) -> dict[str, Any]:
    """JSON-able report: per layer, per expert its load share, top tokens (count, and the share of that
    token's pairs the expert got), category and part shares with lifts, and its most over-represented
    category and part."""
    parts = [*part_names, UNKNOWN_PART]
    report: dict[str, Any] = {"categories": list(category_names), "parts": parts, "layers": {}}
    for name, c in counts.items():
        layer_total = int(c.token.sum())
        layer_cat = _shares(c.category.sum(0))
        layer_part = _shares(c.part.sum(0))
        token_totals = c.token.sum(0)  # (V,)
        experts = []
        for e in range(c.token.shape[0]):
            row = c.token[e]
            n = int(row.sum())
            k = min(top_tokens, int((row > 0).sum()))
            top = torch.topk(row, k) if k else None
            tokens = []
            if top is not None:
                for count, tid in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    tokens.append(
                        {"id": tid, "piece": pieces[tid], "count": count,
                         "share_of_token": count / max(int(token_totals[tid]), 1)}
                    )  # fmt: skip
            cat_share = _shares(c.category[e])
            part_share = _shares(c.part[e])
            cat_lift = _lifts(cat_share, layer_cat)
            part_lift = _lifts(part_share, layer_part)
            experts.append(
                {
                    "expert": e,
                    "pairs": n,
                    "load_share": n / layer_total if layer_total else 0.0,
                    "top_tokens": tokens,
                    "category_share": dict(zip(category_names, cat_share, strict=True)),
                    "category_lift": dict(zip(category_names, cat_lift, strict=True)),
                    "part_share": dict(zip(parts, part_share, strict=True)),
                    "part_lift": dict(zip(parts, part_lift, strict=True)),
                    "top_category": _top_lift(category_names, cat_lift, cat_share),
                    "top_part": _top_lift(parts, part_lift, part_share),
                }
            )
        report["layers"][name] = {
            "pairs": layer_total,
            "category_share": dict(zip(category_names, layer_cat, strict=True)),
            "part_share": dict(zip(parts, layer_part, strict=True)),
            "experts": experts,
        }
    return report


def _top_lift(names: Sequence[str], lifts: list[float | None], shares: list[float], min_share: float = 0.02):
    """The name with the largest lift among those holding at least ``min_share`` of the expert's pairs."""
    best = None
    for name, lift, share in zip(names, lifts, shares, strict=True):
        if lift is not None and share >= min_share and (best is None or lift > best[1]):
            best = (name, lift)
    return None if best is None else {"name": best[0], "lift": best[1]}


def _piece(text: str) -> str:
    shown = repr(text)[1:-1].replace("|", "\\|").replace("`", "'")
    return f"`{shown}`" if shown else "``"


def specialization_markdown(report: dict[str, Any], max_tokens: int = 6) -> str:
    """The report as a markdown section: per layer one row per expert, then a category-lift table."""
    lines = ["## Expert specialization", ""]
    lines.append(
        "Routed (token, expert) pairs on validation text, eval mode. *Lift* = share of the expert's pairs in "
        "a category or Bible part / that share over the whole layer (1 = no preference)."
    )
    for name, layer in report["layers"].items():
        lines += ["", f"### {name} ({layer['pairs']:,} pairs)", ""]
        lines.append("| expert | load | tokens it gets most | top category (lift) | top part (lift) |")
        lines.append("|---:|---:|---|---|---|")
        for ex in layer["experts"]:
            toks = ", ".join(_piece(t["piece"]) for t in ex["top_tokens"][:max_tokens]) or "-"
            cat = ex["top_category"]
            part = ex["top_part"]
            cat_s = f"{cat['name']} ({cat['lift']:.2f})" if cat else "-"
            part_s = f"{part['name']} ({part['lift']:.2f})" if part else "-"
            lines.append(f"| {ex['expert']} | {ex['load_share']:.1%} | {toks} | {cat_s} | {part_s} |")
        cats = [c for c in report["categories"] if layer["category_share"].get(c, 0) > 0]
        parts = [p for p in report["parts"] if layer["part_share"].get(p, 0) > 0]
        for title, names, key, base in (
            ("Category lift", cats, "category_lift", "category_share"),
            ("Bible-part lift", parts, "part_lift", "part_share"),
        ):
            if not names:
                continue
            lines += ["", f"{title} per expert (layer share in the header):", ""]
            lines.append("| expert | " + " | ".join(f"{n} ({layer[base][n]:.0%})" for n in names) + " |")
            lines.append("|---:|" + "---:|" * len(names))
            for ex in layer["experts"]:
                cells = [ex[key][n] for n in names]
                lines.append(
                    f"| {ex['expert']} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |"
                )
    return "\n".join(lines) + "\n"


def analyze_specialization(
    model: nn.Module, batches: Sequence[Any], tokenizer: Any, part_names: Sequence[str], top_tokens: int = 8
) -> dict[str, Any]:
    """`collect_counts` + `specialization_report` with moekit's token categories of ``tokenizer``."""
    from moekit.data import CATEGORY_NAMES, category_ids

    cats = category_ids(tokenizer)
    counts = collect_counts(model, batches, cats, len(CATEGORY_NAMES), len(part_names))
    return specialization_report(counts, tokenizer.pieces(), CATEGORY_NAMES, part_names, top_tokens)
