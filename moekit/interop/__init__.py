"""Hugging Face interop: transformers MoE models on moekit layers, checkpoint conversion, matching losses.

- ``patch_hf_model(model)``: swap every sparse MoE block of a loaded transformers model for a moekit layer on
  the same weights (same logits, same ``output_router_logits`` and aux loss).
- ``convert(src, dst, to="hf" | "moekit")``: checkpoint directories both ways (Mixtral, Qwen2/3-MoE,
  moekit LM).
- ``hf_load_balancing_loss`` / ``hf_switch_router_losses``: transformers' aux losses from moekit outputs.

Needs ``transformers`` (``pip install moekit[hf]``) only for the models and configs themselves.
"""

from moekit.interop.compat_loss import hf_load_balancing_loss, hf_switch_router_losses, record_moe_outputs
from moekit.interop.convert import convert, hf_config_for_lm, load_moekit_checkpoint, save_moekit_checkpoint
from moekit.interop.patch import HFMoEBlock, patch_hf_model
from moekit.interop.registry import FAMILIES, Family, supported_model_types

__all__ = [
    "FAMILIES",
    "Family",
    "HFMoEBlock",
    "convert",
    "hf_config_for_lm",
    "hf_load_balancing_loss",
    "hf_switch_router_losses",
    "load_moekit_checkpoint",
    "patch_hf_model",
    "record_moe_outputs",
    "save_moekit_checkpoint",
    "supported_model_types",
]
