"""The compat losses equal transformers' functions, and relate to moekit's default as documented."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import transformers  # noqa: F401  (skips the module without transformers)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.switch_transformers import modeling_switch_transformers as switch

from moekit.interop import hf_load_balancing_loss, hf_switch_router_losses
from moekit.losses import load_balance_loss
from moekit.models import LMConfig, MoETransformerLM

GEN = torch.Generator().manual_seed(0)


def _layers(n: int, rows: int, E: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple((2 * torch.randn(rows, E, generator=GEN)).to(dtype) for _ in range(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_transformers_load_balancing_loss(dtype: torch.dtype) -> None:
    B, L, E, k = 3, 7, 8, 2
    logits = _layers(3, B * L, E, dtype)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, 5:] = 0
    for attention_mask in (None, mask):
        want = load_balancing_loss_func(logits, E, k, attention_mask)
        got = hf_load_balancing_loss([t.float() for t in logits], k, attention_mask, logits_dtype=dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_single_layer_relation_to_moekit_default() -> None:
    """Documented: for one layer without padding, transformers' value is k times moekit's load_balance."""
    T, E, k = 40, 8, 3
    (logits,) = _layers(1, T, E)
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(k, dim=-1).indices.reshape(-1), minlength=E)
    moekit_value = load_balance_loss(probs, counts)
    torch.testing.assert_close(hf_load_balancing_loss([logits], k), k * moekit_value, rtol=1e-6, atol=0)


def test_from_moekit_lm_outputs_with_padding() -> None:
    """moekit routes only real tokens; the compat value equals transformers' on full rows + attention mask."""
    torch.manual_seed(0)
    lm = MoETransformerLM(LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=8, num_experts=4))
    idx = torch.randint(0, 32, (2, 6), generator=GEN)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = lm(idx, attention_mask=mask)
    full = []
    for moe in out.moe_outputs:  # (T_real, E) -> (B*L, E) with garbage in the padding rows
        rows = torch.full((12, 4), 123.0)
        rows[mask.reshape(-1)] = moe.router_logits
        full.append(rows)
    want = load_balancing_loss_func(tuple(full), 4, 2, mask.long())
    torch.testing.assert_close(hf_load_balancing_loss(out.moe_outputs, 2, mask), want, rtol=1e-6, atol=0)


def test_switch_router_losses_equal_transformers() -> None:
    logits = [2 * torch.randn(3, 5, 4, generator=GEN) for _ in range(2)]
    z, aux = hf_switch_router_losses(logits)
    cat = torch.cat(logits, dim=1)
    torch.testing.assert_close(z, switch.router_z_loss_func(cat), rtol=0, atol=0)
    want = switch.load_balancing_loss_func(cat.softmax(-1), cat.argmax(-1))
    torch.testing.assert_close(aux, want, rtol=0, atol=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="top_k"):
        hf_load_balancing_loss(_layers(1, 4, 4), 0)
    with pytest.raises(ValueError, match="at least one"):
        hf_load_balancing_loss([], 2)
    with pytest.raises(ValueError, match="at least one"):
        hf_switch_router_losses([])
