"""MoE decoder-only language model: config, layers, generation."""

from moekit.models.attention import KVCache
from moekit.models.config import LMConfig
from moekit.models.lm import LMOutput, MoETransformerLM

__all__ = ["KVCache", "LMConfig", "LMOutput", "MoETransformerLM"]
