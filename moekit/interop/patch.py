"""Swap the sparse MoE blocks of a loaded transformers model for moekit layers holding the same weights.

``patch_hf_model(model)`` replaces every supported block (``moekit.interop.registry.FAMILIES``) in place
with an ``HFMoEBlock``: a thin module whose ``moe`` child is a moekit ``MoELayer`` built around the block's
own Parameters (the 3-D expert tensors, the shared expert's Linears, the router module itself). The router
module is called as is, so transformers' ``output_router_logits`` recorders and its aux loss keep working, and
the routing decisions are bit-identical to the unpatched model. Dispatch, grouped GEMMs, combine, shared
experts, losses and routing statistics are moekit's.

``HFMoEBlock.state_dict()`` uses the block's original transformers names (a state-dict hook renames), so a
patched model still saves with ``save_pretrained`` and loads the unpatched model's state dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch.backends import resolve_backend
from moekit.interop.capacity import SequenceCapacityMoELayer
from moekit.interop.registry import Family, family_for_block, supported_model_types
from moekit.interop.routers import HFGateRouter
from moekit.layer import MoELayer


class HFMoEBlock(nn.Module):
    """A transformers sparse MoE block computed by moekit: ``forward(hidden_states) -> hidden_states``.

    ``moe`` is the ``MoELayer`` (its forward hooks see the full ``MoEOutput``: losses, stats, router logits).
    """

    def __init__(self, family: Family, moe: MoELayer, num_experts: int, jitter_noise: float = 0.0) -> None:
        super().__init__()
        self.family = family
        self.moe = moe
        self.num_experts = num_experts
        self.jitter_noise = float(jitter_noise)
        self._renames = _renames(family)  # (moekit name prefix, transformers name prefix), longest first
        self.register_state_dict_post_hook(_to_hf_names)
        self.register_load_state_dict_pre_hook(_from_hf_names)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if self.training and self.jitter_noise > 0:  # Mixtral's block-level jitter, same RNG draw
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        return self.moe(hidden_states).output

    def extra_repr(self) -> str:
        return f"family={self.family.name!r}"


def patch_hf_model(model: nn.Module, backend: str = "auto") -> int:
    """Replace every supported sparse MoE block of ``model`` in place; return how many were replaced.

    ``backend`` is the moekit grouped-GEMM backend (``"auto"``, ``"grouped_mm"``, ``"bmm"``, ``"loop"``).
    Blocks already patched are left alone (a second call returns 0). Raises ValueError naming the model type
    when the model has no supported block at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}")
    targets = [(name, m, f) for name, m in model.named_modules() if (f := family_for_block(m)) is not None]
    if not targets:
        if any(isinstance(m, HFMoEBlock) for m in model.modules()):
            return 0
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None) or "unknown"
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) has no sparse MoE block moekit can patch; "
            f"supported model types: {supported_model_types()}"
        )
    for name, block, family in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, patch_block(block, family, backend))
    return len(targets)


def patch_block(block: nn.Module, family: Family, backend: str = "auto") -> HFMoEBlock:
    """An ``HFMoEBlock`` computing ``block`` with moekit, sharing its Parameters (copying only ``modules``
    experts, which no view can stack)."""
    gate = getattr(block, family.gate)
    experts = getattr(block, family.experts)
    if family.expert_layout == "fused":
        if not hasattr(experts, "gate_up_proj"):
            raise ValueError(
                f"{family.name}: {type(block).__name__} has no fused 3-D experts (gate_up_proj); "
                "moekit patches the transformers >= 5 layout"
            )
        w_in, w_down = experts.gate_up_proj, experts.down_proj  # (E, 2F, D), (E, D, F)
        E, D, d_ff = w_down.shape
        activation = _activation(experts.act_fn, gated=True)
    else:
        modules = [experts[f"expert_{i}"] for i in range(len(experts))]
        w_in = _stacked([m.wi.weight for m in modules])  # (E, F, D)
        w_down = _stacked([m.wo.weight for m in modules])  # (E, D, F)
        E, D, d_ff = w_down.shape
        activation = _activation(modules[0].act, gated=False)
    k = 1 if family.scheme == "switch" else int(gate.top_k)
    router = HFGateRouter(gate, family.scheme, E, k)
    shared = getattr(block, family.shared) if family.shared else None
    shared_gate = getattr(block, family.shared_gate) if family.shared_gate else None
    if shared is not None and _activation(shared.act_fn, gated=True) != "swiglu":
        raise ValueError(f"{family.name}: moekit's shared experts are SwiGLU; this block's activation differs")
    kwargs = dict(
        k=k,
        router=router,
        activation=activation,
        num_shared_experts=1 if shared is not None else 0,
        shared_d_ff=shared.gate_proj.out_features if shared is not None else None,
        shared_gate=shared_gate is not None,
        backend=backend,
    )
    with torch.device("meta"):  # allocate nothing: every tensor is replaced by the block's own below
        if family.scheme == "switch":
            layer: MoELayer = SequenceCapacityMoELayer(D, d_ff, E, expert_capacity=int(gate.expert_capacity), **kwargs)
        else:
            layer = MoELayer(D, d_ff, E, **kwargs)
    in_name = "gate_up_proj" if activation in ("swiglu", "geglu") else "up_proj"
    setattr(layer.experts, in_name, w_in)
    layer.experts.down_proj = w_down
    if shared is not None:
        layer.shared.gate_proj, layer.shared.up_proj = shared.gate_proj, shared.up_proj
        layer.shared.down_proj = shared.down_proj
        layer.shared.shared_expert_gate = shared_gate
    layer.load_since_step = torch.zeros(E, dtype=torch.long, device=w_down.device)
    with torch.enable_grad():  # the grouped_mm probe runs a backward; under no_grad it would cache "no"
        resolve_backend(backend, w_in.new_empty(0, D), w_in)
    jitter = float(getattr(block, family.jitter_attr, 0.0) or 0.0) if family.jitter_attr else 0.0
    patched = HFMoEBlock(family, layer, E, jitter)
    patched.train(block.training)
    return patched


def _stacked(weights: list[Tensor]) -> nn.Parameter:
    """One (E, ...) Parameter from per-expert weights (a copy)."""
    return nn.Parameter(torch.stack([w.detach() for w in weights]), requires_grad=weights[0].requires_grad)


def _activation(act: nn.Module, gated: bool) -> str:
    """moekit's activation name for a transformers activation module, checked numerically (not by name)."""
    probe = torch.linspace(-6.0, 6.0, 241)
    got = act(probe)
    candidates = ((F.silu, "swiglu"), (F.gelu, "geglu")) if gated else ((F.relu, "relu"), (F.gelu, "gelu"))
    for fn, name in candidates:
        if torch.equal(got, fn(probe)):
            return name
    expected = "silu or gelu (gated)" if gated else "relu or gelu"
    raise ValueError(f"expert activation {type(act).__name__} is not one moekit's GroupedFFN computes ({expected})")


# ------------------------------------------------------------------------- transformers names in state dicts


def _renames(family: Family) -> tuple[tuple[str, str], ...]:
    pairs = [("moe.router.gate.", f"{family.gate}."), ("moe.experts.", f"{family.experts}.")]
    if family.shared_gate:
        pairs.append(("moe.shared.shared_expert_gate.", f"{family.shared_gate}."))
    if family.shared:
        pairs.append(("moe.shared.", f"{family.shared}."))
    return tuple(sorted(pairs, key=lambda p: -len(p[0])))


def _to_hf_names(module: HFMoEBlock, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post hook: moekit names -> the block's transformers names (in place)."""
    if module.family.expert_layout == "modules":
        for name, hf in (("up_proj", "wi"), ("down_proj", "wo")):
            stacked = state_dict.pop(f"{prefix}moe.experts.{name}", None)
            if stacked is not None:
                for i in range(stacked.shape[0]):
                    state_dict[f"{prefix}{module.family.experts}.expert_{i}.{hf}.weight"] = stacked[i]
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for ours, theirs in module._renames:
            if rest.startswith(ours):
                state_dict[prefix + theirs + rest[len(ours) :]] = state_dict.pop(key)
                break


def _from_hf_names(module: HFMoEBlock, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre hook: the block's transformers names -> moekit names (in place)."""
    family = module.family
    if family.expert_layout == "modules":
        for name, hf in (("up_proj", "wi"), ("down_proj", "wo")):
            keys = [f"{prefix}{family.experts}.expert_{i}.{hf}.weight" for i in range(module.num_experts)]
            if all(k in state_dict for k in keys):
                state_dict[f"{prefix}moe.experts.{name}"] = torch.stack([state_dict.pop(k) for k in keys])
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        for ours, theirs in module._renames:
            if rest.startswith(theirs):
                state_dict[prefix + ours + rest[len(theirs) :]] = state_dict.pop(key)
                break
