"""patch_hf_model: every family's patched model computes what transformers computes, on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import FAMILIES, PATCHED, VOCAB, assert_close, max_diff, tiny_model, transformers

from moekit.interop import HFMoEBlock, hf_load_balancing_loss, patch_hf_model, record_moe_outputs
from moekit.interop.capacity import plan_sequence_capacity
from moekit.interop.registry import family_by_name, family_for_block
from moekit.interop.routers import HFGateRouter, native_router
from moekit.layer import MoELayer
from moekit.routing.base import Routing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _pair(family: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf = tiny_model(family).to(dtype)
    patched = copy.deepcopy(hf)
    assert patch_hf_model(patched) == PATCHED[family]
    return hf, patched


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 9) token ids and an attention mask with the second row left-padded by 3."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "switch_transformers"])
def test_decoder_models_match(family: str, dtype: str) -> None:
    torch_dtype = DTYPES[dtype]
    hf, patched = _pair(family, torch_dtype)
    ids, mask = _batch()
    for attention_mask in (None, mask):
        with torch.no_grad():
            want = hf(ids, attention_mask=attention_mask, output_router_logits=True)
            with record_moe_outputs(patched) as moe_outputs:
                got = patched(ids, attention_mask=attention_mask, output_router_logits=True)
            spread = _eager_spread(hf, want, ids, attention_mask) if torch_dtype == torch.bfloat16 else {}
        assert_close(got.logits, want.logits, torch_dtype, spread.get("logits", 0.0), "logits")
        assert len(got.router_logits) == len(want.router_logits) == PATCHED[family]
        torch.testing.assert_close(got.router_logits[0], want.router_logits[0], rtol=0, atol=0)  # same input
        for g, w in zip(got.router_logits, want.router_logits, strict=True):
            assert_close(g, w, torch_dtype, spread.get("router_logits", 0.0), "router logits")
        if want.aux_loss is not None:  # transformers' own aux loss, fed by the recorded router logits
            atol = 1e-6 * float(want.aux_loss) if torch_dtype == torch.float32 else spread["aux_loss"]
            torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=0, atol=atol)
            # ... and the compat function computes the same value from moekit's own outputs.
            compat = hf_load_balancing_loss(
                moe_outputs, patched.config.num_experts_per_tok, attention_mask, logits_dtype=torch_dtype
            )
            torch.testing.assert_close(compat, got.aux_loss, rtol=1e-6, atol=0)
        assert len(moe_outputs) == PATCHED[family]
    # Greedy generation of 20 tokens from a batch with one left-padded row.
    gen = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    got_ids = patched.generate(ids, **gen)
    assert got_ids.shape == (2, 29)
    want_ids = [hf.generate(ids, **gen)]
    if torch_dtype == torch.bfloat16 and not torch.equal(got_ids, want_ids[0]):
        hf.set_experts_implementation("eager")  # a bf16 near-tie may flip: side with either HF implementation
        want_ids.append(hf.generate(ids, **gen))
    assert any(torch.equal(got_ids, w) for w in want_ids)


def _eager_spread(hf: torch.nn.Module, default, ids, attention_mask) -> dict[str, float]:
    """How far transformers' eager experts are from its default (grouped_mm) ones, per output
    (the bf16 yardstick).

    The aux-loss entry is at least 2% of the loss (bf16 has 8 mantissa bits).
    """
    hf.set_experts_implementation("eager")
    try:
        eager = hf(ids, attention_mask=attention_mask, output_router_logits=True)
    finally:
        hf.set_experts_implementation("grouped_mm")
    router = max(max_diff(a, b) for a, b in zip(eager.router_logits, default.router_logits, strict=True))
    spread = {"logits": max_diff(eager.logits, default.logits), "router_logits": router}
    if default.aux_loss is not None:
        spread["aux_loss"] = max(max_diff(eager.aux_loss, default.aux_loss), 2e-2 * float(default.aux_loss))
    return spread


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_switch_transformers_matches(dtype: str) -> None:
    torch_dtype = DTYPES[dtype]
    hf, patched = _pair("switch_transformers", torch_dtype)
    ids, mask = _batch()
    mask = mask.flip(1)  # T5-style right padding
    dec = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    for attention_mask in (None, mask):
        kw = dict(input_ids=ids, attention_mask=attention_mask, decoder_input_ids=dec, output_router_logits=True)
        with torch.no_grad():
            want = hf(**kw)
            with record_moe_outputs(patched) as moe_outputs:
                got = patched(**kw)
        assert_close(got.logits, want.logits, torch_dtype, msg="logits")
        for side in ("encoder", "decoder"):
            for g, w in zip(getattr(got, f"{side}_router_logits"), getattr(want, f"{side}_router_logits"), strict=True):
                assert g.shape == (2, ids.shape[1] if side == "encoder" else dec.shape[1], 4)
                assert_close(g, w, torch_dtype, msg=f"{side} router logits")
            for loss in ("z_loss", "aux_loss"):
                g, w = getattr(got, f"{side}_{loss}"), getattr(want, f"{side}_{loss}")
                torch.testing.assert_close(g, w, rtol=1e-6 if torch_dtype == torch.float32 else 2e-2, atol=0)
        # Capacity 3 per sequence and expert: some tokens are dropped, and moekit's plan says how many.
        assert sum(int(o.stats["dropped_per_expert"].sum()) for o in moe_outputs) > 0
    want_ids = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    got_ids = patched.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(got_ids, want_ids)


def test_parameters_are_shared_not_copied() -> None:
    for family in ("qwen2_moe", "deepseek_v3"):
        model = tiny_model(family)
        blocks = [m for m in model.modules() if family_for_block(m) is not None]
        fam = family_by_name(family)
        expected = [
            {
                "gate": getattr(b, fam.gate).weight,
                "gate_up": b.experts.gate_up_proj,
                "down": b.experts.down_proj,
                "shared_down": getattr(b, fam.shared).down_proj.weight,
            }
            for b in blocks
        ]
        patch_hf_model(model)
        patched = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
        assert len(patched) == len(expected)
        for block, want in zip(patched, expected, strict=True):
            layer = block.moe
            assert isinstance(layer, MoELayer)
            assert layer.router.gate.weight is want["gate"]
            assert layer.experts.gate_up_proj is want["gate_up"]
            assert layer.experts.down_proj is want["down"]
            assert layer.shared.down_proj.weight is want["shared_down"]
    assert patch_hf_model(model) == 0  # already patched


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "switch_transformers"])
def test_state_dict_keeps_transformers_names(family: str, tmp_path) -> None:
    hf, patched = _pair(family, torch.float32)
    want, got = hf.state_dict(), patched.state_dict()
    assert list(want) == list(got) or sorted(want) == sorted(got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # A patched model loads an unpatched state dict, saves with save_pretrained and reloads unpatched.
    other = copy.deepcopy(patched)
    for p in other.parameters():
        torch.nn.init.zeros_(p)
    other.load_state_dict(want)
    patched.save_pretrained(tmp_path)
    cls = type(hf)
    reloaded = cls.from_pretrained(tmp_path).eval()
    ids, _ = _batch()
    kw = {"decoder_input_ids": ids} if family == "switch_transformers" else {}
    with torch.no_grad():
        ref = patched(ids, **kw).logits
        torch.testing.assert_close(other(ids, **kw).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(reloaded(ids, **kw).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_training_step_gives_the_same_gradients(family: str) -> None:
    hf = tiny_model(family)
    if family == "mixtral":  # block-level input jitter in training: same RNG draw in both
        for block in hf.modules():
            if hasattr(block, "jitter_noise"):
                block.jitter_noise = 0.1
    patched = copy.deepcopy(hf)
    patch_hf_model(patched)
    ids, mask = _batch()
    grads = []
    for model in (hf, patched):
        model.train()
        torch.manual_seed(7)
        out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        out.loss.backward()
        grads.append(_named_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def _named_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients by the model's state-dict (transformers) names: the patched model's names are renamed."""
    by_id = {id(p): p.grad for p in model.parameters() if p.grad is not None}
    return {name: by_id[id(t)] for name, t in model.state_dict(keep_vars=True).items() if id(t) in by_id}


def test_model_without_moe_block_names_its_type() -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ValueError, match="'llama'"):
        patch_hf_model(transformers.LlamaForCausalLM(config))
    with pytest.raises(TypeError, match="nn.Module"):
        patch_hf_model("not a model")


@pytest.mark.parametrize("family", FAMILIES)
def test_native_moekit_router_makes_the_same_choice(family: str) -> None:
    """The registry's ``moekit_router`` computes the transformers gate's routing from the same weights."""
    model = tiny_model(family)
    fam = family_by_name(family)
    gate = next(getattr(m, fam.gate) for m in model.modules() if family_for_block(m) is fam)
    native = native_router(fam, gate)
    k = 1 if fam.scheme == "switch" else gate.top_k
    adapter = HFGateRouter(gate, fam.scheme, native.num_experts, k)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    seq = torch.zeros(40, dtype=torch.long)
    with torch.no_grad():
        a, b = native(x, seq_ids=seq), adapter(x, seq_ids=seq)
    ea, oa = a.expert_idx.view(k, -1).t().sort(dim=-1)
    eb, ob = b.expert_idx.view(k, -1).t().sort(dim=-1)
    assert torch.equal(ea, eb)
    wa, wb = a.weight.view(k, -1).t().gather(1, oa), b.weight.view(k, -1).t().gather(1, ob)
    torch.testing.assert_close(wa, wb, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-6, atol=1e-7)


def test_sequence_capacity_plan_matches_transformers_rule() -> None:
    """Kept pairs are exactly those with ``cumsum(one_hot(expert), positions) <= capacity`` per sequence."""
    gen = torch.Generator().manual_seed(0)
    B, L, E, C = 3, 11, 4, 2
    experts = torch.randint(0, E, (B, L), generator=gen)
    T = B * L
    routing = Routing(torch.arange(T), experts.reshape(-1), torch.rand(T, generator=gen), T, E)
    seq = torch.arange(B).repeat_interleave(L)
    plan = plan_sequence_capacity(routing, seq, C)
    one_hot = torch.nn.functional.one_hot(experts, E)  # (B, L, E)
    kept_hf = ((one_hot.cumsum(dim=1) <= C) & one_hot.bool()).any(-1).reshape(-1)  # (T,)
    assert sorted(plan.token_idx.tolist()) == kept_hf.nonzero().squeeze(1).tolist()
    assert torch.equal(plan.counts, torch.bincount(routing.expert_idx[plan.pair_order], minlength=E))
    assert (torch.diff(routing.expert_idx[plan.pair_order]) >= 0).all()  # grouped by expert
    assert torch.equal(plan.routed - plan.dropped, plan.counts)
    assert int(plan.counts.max()) <= B * C
