"""transformers' auxiliary losses, computed from moekit outputs (the "compat" option).

``hf_load_balancing_loss`` gives exactly the value of transformers' ``load_balancing_loss_func`` (Mixtral,
Qwen2/3-MoE, OLMoE, ...), ``hf_switch_router_losses`` that of SwitchTransformers' z-loss and aux loss, from
``MoEOutput``s (``MoETransformerLM``'s ``moe_outputs``, or those ``record_moe_outputs`` collects from a
patched transformers model) or from raw router logits.

Where moekit's default ``load_balance`` loss (``moekit.losses.load_balance_loss``) differs from transformers':

- **f_i per pair, not per token.** moekit: ``f_i`` = expert i's share of all (token, expert) pairs, so a
  balanced router scores 1 whatever k. transformers divides the counts by tokens, so its value is k times
  larger for the same routing (balanced top-k: k, not 1).
- **Per layer, not pooled.** moekit computes one loss per MoE layer (the LM sums them, each layer weighted by
  its ``loss_weights``). transformers concatenates every layer's tokens first and computes one ``f`` and one
  ``P`` over all of them, so its value is not the mean of per-layer losses.
- **The choice the layer made.** moekit counts the pairs the router actually chose (biased DeepSeek top-k,
  expert choice, top-p ...), before capacity drops. transformers recomputes a plain softmax top-k from the
  logits.
- **Padding.** moekit routes only real tokens, so padding never counts. transformers counts every row unless
  ``attention_mask`` is passed to the model's forward, then weights rows by it: the same as dropping them.
- **Batch.** Both are per forward call (micro-batch); neither all-reduces counts over a global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moekit.layer import MoELayer
from moekit.output import MoEOutput


def hf_load_balancing_loss(
    outputs: Sequence[MoEOutput | Tensor],
    top_k: int,
    attention_mask: Tensor | None = None,
    logits_dtype: torch.dtype | None = None,
) -> Tensor:
    """transformers' ``load_balancing_loss_func`` from per-layer router logits: a float32 scalar.

    ``outputs``: per MoE layer, an ``MoEOutput`` (its ``router_logits``) or a (T, E) / (B, L, E) logits
    tensor. ``attention_mask`` (B, L): applied to layers whose logits have B*L rows (a patched transformers
    model routes padding too); layers with fewer rows (a moekit model already dropped padding) are taken as
    they are.
    ``logits_dtype``: the dtype the model computed its router logits in (e.g. bfloat16): transformers applies
    its softmax in that dtype, while ``MoEOutput.router_logits`` are float32 copies.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    layers = [_logits(o) for o in outputs]
    if not layers:
        raise ValueError("outputs must hold at least one layer's router logits")
    E = layers[0].shape[-1]
    device = layers[0].device
    flat_mask = None
    if attention_mask is not None:
        flat_mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)  # (B*L,)
    histc_dtype = torch.float32 if device.type in ("cpu", "mps") else torch.int32
    tokens_per_expert_sum = torch.zeros(E, dtype=torch.float32, device=device)
    router_prob_sum = torch.zeros(E, dtype=torch.float32, device=device)
    total_rows: Tensor | float = 0.0
    # The same reductions, in the same order and dtypes, as transformers' function.
    for layer_gate in layers:
        if logits_dtype is not None:
            layer_gate = layer_gate.to(logits_dtype)
        routing_weights = torch.softmax(layer_gate, dim=-1)  # (T, E)
        _, selected = torch.topk(routing_weights, top_k, dim=-1)  # (T, K)
        if flat_mask is None or flat_mask.numel() != layer_gate.shape[0]:
            counts = torch.histc(selected.reshape(-1).to(histc_dtype), bins=E, min=0, max=E)
            tokens_per_expert_sum = tokens_per_expert_sum + counts
            router_prob_sum = router_prob_sum + routing_weights.float().sum(dim=0)
            total_rows = total_rows + routing_weights.shape[0]
        else:
            counts = torch.zeros(E, dtype=torch.float32, device=device).scatter_add_(
                0, selected.reshape(-1), flat_mask.repeat_interleave(top_k)
            )
            tokens_per_expert_sum = tokens_per_expert_sum + counts
            router_prob_sum = router_prob_sum + (routing_weights.float() * flat_mask.unsqueeze(-1)).sum(dim=0)
            total_rows = total_rows + flat_mask.sum()
    tokens_per_expert = tokens_per_expert_sum / total_rows
    router_prob_per_expert = router_prob_sum / total_rows
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * E


def hf_switch_router_losses(router_logits: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """SwitchTransformers' ``(router_z_loss, load_balancing_loss)`` of one stack (encoder or decoder).

    ``router_logits``: per sparse layer, (B, L, E) logits (what ``encoder_router_logits`` holds). As in
    transformers, layers are concatenated along positions, each batch row is a group, every position counts
    (no padding mask) and the expert of a token is the argmax of its logits.
    """
    if not router_logits:
        raise ValueError("router_logits must hold at least one layer's (B, L, E) logits")
    logits = torch.cat(list(router_logits), dim=1)  # (B, n_layers * L, E)
    num_groups, tokens_per_group, E = logits.shape
    z_loss = torch.sum(torch.logsumexp(logits, dim=-1) ** 2) / (num_groups * tokens_per_group)
    probs = torch.softmax(logits, dim=-1)
    expert_mask = torch.nn.functional.one_hot(logits.argmax(dim=-1), E).to(torch.float32)  # (B, n*L, E)
    tokens_per_group_and_expert = expert_mask.mean(dim=-2)  # (B, E)
    prob_per_group_and_expert = probs.mean(dim=-2)  # (B, E)
    aux_loss = torch.mean(tokens_per_group_and_expert * prob_per_group_and_expert) * E**2
    return z_loss, aux_loss


@contextmanager
def record_moe_outputs(model: nn.Module) -> Iterator[list[MoEOutput]]:
    """Collect the ``MoEOutput`` of every ``MoELayer`` forward inside the block, in call order.

    For a patched transformers model the layers are the ``moe`` children of its ``HFMoEBlock``s. Hooks are
    removed on exit.
    """
    collected: list[MoEOutput] = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, MoEOutput):
            collected.append(output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoELayer)]
    if not handles:
        raise ValueError(f"{type(model).__name__} contains no moekit MoELayer (patch it first)")
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()


def _logits(output: MoEOutput | Tensor) -> Tensor:
    logits = output.router_logits if isinstance(output, MoEOutput) else output
    if not isinstance(logits, Tensor):
        raise TypeError("each output must be an MoEOutput with router_logits or a logits tensor")
    return logits.reshape(-1, logits.shape[-1])
