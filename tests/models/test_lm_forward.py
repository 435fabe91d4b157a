"""MoETransformerLM forward: shapes, loss, causality, KV cache, GQA, padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.models import KVCache, LMOutput, MoETransformerLM

V = 64


def model_for(config, seed: int = 0, train: bool = False) -> MoETransformerLM:
    torch.manual_seed(seed)
    return MoETransformerLM(config).train(train)


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_experts", [4, 0])
def test_forward_shapes(make_config, num_experts):
    model = model_for(make_config(num_experts=num_experts))
    out = model(tokens(3, 10))
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (3, 10, V)
    assert out.loss is None and out.total_loss is None
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32
    assert len(out.moe_outputs) == (2 if num_experts else 0)
    for moe in out.moe_outputs:
        assert moe.output.shape == (3, 10, 32)
    if not num_experts:
        assert out.aux_loss.item() == 0.0


def test_loss_is_cross_entropy_and_total_adds_aux(make_config):
    model = model_for(make_config(), train=True)
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    targets[0, :3] = -100
    out = model(idx, targets=targets)
    expected = F.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    aux = sum(m.aux_loss for m in out.moe_outputs)
    torch.testing.assert_close(out.aux_loss, aux)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.total_loss, out.loss + out.aux_loss)
    out.total_loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_loss_with_every_target_ignored_is_zero_not_nan(make_config):
    model = model_for(make_config())
    idx = tokens(1, 5)
    out = model(idx, targets=torch.full_like(idx, -100))
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("num_experts", [4, 0])
def test_causal_future_tokens_do_not_change_past_logits(make_config, num_experts):
    model = model_for(make_config(num_experts=num_experts))
    idx = tokens(2, 12)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_kv_cache_decoding_matches_full_forward(make_config, n_kv_heads):
    model = model_for(make_config(n_kv_heads=n_kv_heads, moe_every=2))
    idx = tokens(2, 14)
    full = model(idx).logits  # (2, 14, V)
    cache = model.init_kv_cache(batch_size=2)
    assert isinstance(cache, KVCache)
    pieces = [model(idx[:, :5], kv_cache=cache, start_pos=0).logits]  # prompt
    pieces.append(model(idx[:, 5:8], kv_cache=cache, start_pos=5).logits)  # a chunk after cached positions
    for pos in range(8, 14):  # one token at a time
        pieces.append(model(idx[:, pos : pos + 1], kv_cache=cache, start_pos=pos).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_gqa_has_fewer_kv_parameters_and_trains(make_config):
    mha = model_for(make_config())
    gqa = model_for(make_config(n_kv_heads=1), train=True)
    attn = gqa.blocks[0].attn
    assert attn.k_proj.weight.shape == (8, 32) and attn.q_proj.weight.shape == (32, 32)
    saved = 2 * 2 * (32 * 32 - 8 * 32)  # k and v projections of 2 layers
    assert mha.param_counts()["total"] - gqa.param_counts()["total"] == saved
    idx = tokens(2, 9)
    out = gqa(idx, targets=idx)
    out.total_loss.backward()
    assert attn.k_proj.weight.grad is not None and torch.isfinite(attn.k_proj.weight.grad).all()


def test_gqa_equals_mha_with_repeated_kv_heads(make_config):
    """GQA with shared kv heads is MHA whose k/v projections repeat each kv head's rows."""
    gqa = model_for(make_config(n_kv_heads=2))
    mha = model_for(make_config())
    state = gqa.state_dict()
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = state[f"blocks.{i}.attn.{name}.weight"]  # (2 * 8, 32): 2 kv heads of dim 8
            state[f"blocks.{i}.attn.{name}.weight"] = w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = tokens(2, 10)
    torch.testing.assert_close(mha(idx).logits, gqa(idx).logits, rtol=0, atol=1e-5)


def test_right_padding_leaves_real_logits_and_loss_unchanged(make_config):
    # Train mode with a capacity factor: padded tokens that were routed would take expert capacity and
    # change which real tokens are dropped, so this checks that padding gets no routing at all.
    model = model_for(make_config(capacity_factor=1.0), train=True)
    idx, targets = tokens(3, 10), tokens(3, 10, seed=2)
    ref = model(idx, targets=targets)
    pad = tokens(3, 6, seed=3)
    padded_idx = torch.cat([idx, pad], dim=1)  # (3, 16)
    padded_targets = torch.cat([targets, pad], dim=1)  # pad targets are not -100: the mask must drop them
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :10] = True
    out = model(padded_idx, targets=padded_targets, attention_mask=mask)
    torch.testing.assert_close(out.logits[:, :10], ref.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-6)
    for moe, moe_ref in zip(out.moe_outputs, ref.moe_outputs, strict=True):
        assert int(moe.stats["num_tokens"]) == 30  # only real tokens routed
        torch.testing.assert_close(moe.stats["tokens_per_expert"], moe_ref.stats["tokens_per_expert"])
        assert moe.output[:, 10:].abs().max() == 0  # padding gets no MoE output


def test_left_padding_is_masked_as_keys(make_config):
    model = model_for(make_config())
    idx = tokens(1, 8)
    ref = model(idx).logits  # (1, 8, V)
    padded = torch.cat([tokens(1, 4, seed=5), idx], dim=1)  # 4 pad tokens first
    mask = torch.tensor([[False] * 4 + [True] * 8])
    out = model(padded, attention_mask=mask).logits
    # RoPE is relative, so shifting every real token by 4 positions changes nothing but rounding.
    torch.testing.assert_close(out[:, 4:], ref, rtol=0, atol=1e-5)
    unmasked = model(padded).logits
    assert not torch.allclose(unmasked[:, 4:], ref, atol=1e-3)  # without the mask the pads are seen


def test_left_padded_batch_decodes_with_kv_cache(make_config):
    model = model_for(make_config())
    short, long = tokens(1, 5, seed=6), tokens(1, 8, seed=7)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])  # (2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    nxt = tokens(2, 3, seed=8)
    cache = model.init_kv_cache(batch_size=2)
    model(batch, attention_mask=mask, kv_cache=cache, start_pos=0)
    steps = [model(nxt[:, i : i + 1], kv_cache=cache, start_pos=8 + i).logits for i in range(3)]
    decoded = torch.cat(steps, dim=1)  # (2, 3, V)
    alone_short = model(torch.cat([short, nxt[:1]], dim=1)).logits[:, 5:]
    alone_long = model(torch.cat([long, nxt[1:]], dim=1)).logits[:, 8:]
    torch.testing.assert_close(decoded[:1], alone_short, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded[1:], alone_long, rtol=0, atol=1e-5)


def test_hash_router_gets_token_ids(make_config):
    model = model_for(make_config(router="hash"))
    idx = tokens(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = model(idx, targets=idx, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
    assert all(int(m.stats["num_tokens"]) == 10 for m in out.moe_outputs)


def test_input_checks(make_config):
    model = model_for(make_config())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 33))
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens(1, 4), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model(tokens(1, 4), targets=tokens(1, 5))
    with pytest.raises(ValueError, match="kv_cache"):
        model(tokens(2, 4), kv_cache=model.init_kv_cache(batch_size=1))
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 4))
