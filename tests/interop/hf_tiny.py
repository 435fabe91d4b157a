"""Tiny random transformers models of every family moekit's interop covers (nothing is downloaded)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 64
# Larger than transformers' 0.02 so that routing is decisive and logits have real margins.
INIT = 0.1
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=INIT,
)


def tiny_config(family: str):
    """A 2-layer config of ``family`` (hidden 32); patched block counts in ``PATCHED``."""
    if family == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # shared expert with sigmoid gate; layer 1 dense
        return transformers.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
        )
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            head_dim=8,
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v3":  # group-limited routing, shared expert, first layer dense
        return transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            v_head_dim=8,
            qk_nope_head_dim=8,
        )
    if family == "switch_transformers":  # capacity 3 per sequence: tokens get dropped
        return transformers.SwitchTransformersConfig(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            num_experts=4,
            expert_capacity=3,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            decoder_start_token_id=0,
            initializer_factor=3.0,
        )
    raise ValueError(family)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "switch_transformers")
PATCHED = {
    "mixtral": 2,
    "qwen2_moe": 1,
    "qwen3_moe": 2,
    "olmoe": 2,
    "deepseek_v3": 1,
    "switch_transformers": 2,
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` in eval mode (DeepSeek's correction bias randomised too)."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    if family == "switch_transformers":
        model = transformers.SwitchTransformersForConditionalGeneration(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0.0, 0.1)
    return model.eval()


def bf16_atol(reference: torch.Tensor) -> float:
    """Two bfloat16 units in the last place at the reference's largest magnitude."""
    scale = float(reference.abs().max())
    return 2 * 2.0 ** (math.floor(math.log2(scale)) - 7) if scale > 0 else 0.0


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, spread: float = 0.0, msg: str = ""
) -> None:
    """fp32: max abs diff <= 1e-5. bf16: <= max(``bf16_atol``, ``spread``), where ``spread`` is how far
    transformers' own experts implementations (eager vs grouped_mm) are apart on the same input: a near-tie
    routing decision can flip between them in bfloat16, and moekit may side with either."""
    atol = 1e-5 if dtype == torch.float32 else max(bf16_atol(expected.float()), spread)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.0, atol=atol, msg=msg or None)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
