"""The transformers MoE families moekit can take over: one small ``Family`` entry each.

An entry says how to find the sparse block (its class name), where its weights live inside the block, how its
router decides (``scheme``, read by ``moekit.interop.routers``), which moekit router computes the same choice
(``moekit_router``), how its experts are named in Hub checkpoints (for ``convert``) and what differs
(``quirks``). Adding a family is adding one entry here (see docs/interop.md, "Adding a family").

Blocks are matched by class name, so this module imports nothing from transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SCHEMES = ("softmax_topk", "deepseek", "switch")
EXPERT_LAYOUTS = ("fused", "modules")


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block maps onto a moekit ``MoELayer``.

    - ``block_class``: class name of the sparse block (the module replaced by ``patch_hf_model``).
    - ``gate``: attribute of the block holding the router module (kept and called, so that transformers'
      ``OutputRecorder`` hooks still record its logits).
    - ``experts``: attribute holding the experts. ``expert_layout="fused"``: 3-D ``gate_up_proj`` (E, 2F, D)
      and ``down_proj`` (E, D, F) Parameters, shared as they are; ``"modules"``: one ``expert_{i}`` module
      each with ``wi`` (F, D) and ``wo`` (D, F) Linears, stacked into one grouped tensor (a copy, no view).
    - ``shared`` / ``shared_gate``: attributes of the always-on shared-expert MLP and of its sigmoid gate.
    - ``scheme``: how the router's outputs become a ``Routing`` (``softmax_topk``, ``deepseek``, ``switch``).
    - ``moekit_router``: the moekit router name computing the same choice from the same weights.
    - ``jitter_attr``: attribute of the block with a training-time input jitter applied by the block itself.
    - ``model_types``: ``config.model_type`` values of this family.
    - ``checkpoint_block`` / ``checkpoint_experts``: in Hub checkpoints, the name of the MoE block inside a
      layer and the per-expert (gate, up, down) weight names, e.g. ``block_sparse_moe.experts.3.w1.weight``.
    - ``quirks``: what a reader must know (documentation only).
    """

    name: str
    block_class: str
    model_types: tuple[str, ...]
    gate: str = "gate"
    experts: str = "experts"
    expert_layout: str = "fused"
    shared: str | None = None
    shared_gate: str | None = None
    scheme: str = "softmax_topk"
    moekit_router: str = "topk"
    jitter_attr: str | None = None
    checkpoint_block: str = "mlp"
    checkpoint_experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    quirks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"Family.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(f"Family.expert_layout must be one of {EXPERT_LAYOUTS}, got {self.expert_layout!r}")


FAMILIES: tuple[Family, ...] = (
    Family(
        name="mixtral",
        block_class="MixtralSparseMoeBlock",
        model_types=("mixtral",),
        moekit_router="topk",
        jitter_attr="jitter_noise",
        checkpoint_block="block_sparse_moe",
        checkpoint_experts=("w1", "w3", "w2"),
        quirks=(
            "softmax over all experts, top-k, renormalised (equal to softmax over the top-k logits)",
            "router logits in the model dtype; combine weights stay float32",
            "router_jitter_noise multiplies the block input in training (reproduced by the patched block)",
        ),
    ),
    Family(
        name="qwen2_moe",
        block_class="Qwen2MoeSparseMoeBlock",
        model_types=("qwen2_moe",),
        shared="shared_expert",
        shared_gate="shared_expert_gate",
        moekit_router="qwen",
        quirks=(
            "top-k of the softmax, renormalised only with norm_topk_prob",
            "one shared expert of width shared_expert_intermediate_size scaled by sigmoid(x @ w_gate)",
            "layers in mlp_only_layers or off decoder_sparse_step are dense and left alone",
        ),
    ),
    Family(
        name="qwen3_moe",
        block_class="Qwen3MoeSparseMoeBlock",
        model_types=("qwen3_moe",),
        moekit_router="qwen",
        quirks=(
            "top-k of the softmax, renormalised only with norm_topk_prob",
            "dense layers (mlp_only_layers, decoder_sparse_step) are left alone",
        ),
    ),
    Family(
        name="olmoe",
        block_class="OlmoeSparseMoeBlock",
        model_types=("olmoe",),
        moekit_router="olmoe",
        quirks=("top-k of the softmax, renormalised only with norm_topk_prob",),
    ),
    Family(
        name="deepseek_v3",
        block_class="DeepseekV3MoE",
        model_types=("deepseek_v3",),
        shared="shared_experts",
        scheme="deepseek",
        moekit_router="deepseek",
        quirks=(
            "sigmoid affinities; experts chosen with e_score_correction_bias inside the best topk_group of "
            "n_group groups (a group scores the sum of its top-2), weights from the unbiased affinities, "
            "renormalised (norm_topk_prob) and scaled by routed_scaling_factor",
            "router logits in float32 whatever the model dtype",
            "ungated shared experts of width n_shared_experts * moe_intermediate_size",
            "the first first_k_dense_replace layers are dense and left alone",
            "Routing.probs are the affinities normalised per token (transformers computes no aux loss here)",
        ),
    ),
    Family(
        name="switch_transformers",
        block_class="SwitchTransformersSparseMLP",
        model_types=("switch_transformers",),
        gate="router",
        expert_layout="modules",
        scheme="switch",
        moekit_router="switch",
        quirks=(
            "top-1 of the softmax (float32), combine weight = that probability in the input dtype",
            "expert_capacity is an absolute count per sequence and expert, in training and in eval: the "
            "first expert_capacity tokens of a sequence (by position) are kept, later ones get zero output; "
            "padding counts too (router_ignore_padding_tokens is not used by transformers)",
            "experts are separate modules: their weights are stacked into one grouped tensor (a copy)",
            "expert dropout (dropout_rate) is not applied by the patched block in training",
            "router_jitter_noise lives in the router module, which is called as is",
        ),
    ),
)


def family_by_name(name: str) -> Family:
    """The family called ``name`` (a ``Family.name``); ValueError naming the known ones otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown family {name!r}; known: {[f.name for f in FAMILIES]}")


def family_for_model_type(model_type: str) -> Family | None:
    """The family whose ``model_types`` holds ``model_type``, or None."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def family_for_block(module: nn.Module) -> Family | None:
    """The family whose sparse block ``module`` is (by class name), or None."""
    cls_name = type(module).__name__
    for family in FAMILIES:
        if family.block_class == cls_name:
            return family
    return None


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` some family covers."""
    return sorted(t for family in FAMILIES for t in family.model_types)
