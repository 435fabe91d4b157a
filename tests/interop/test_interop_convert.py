"""convert(): HF checkpoint directories <-> moekit checkpoints, both ways, tensors identical, logits equal."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import VOCAB, tiny_model, transformers
from safetensors.torch import load_file, save_file

from moekit.interop import convert, hf_config_for_lm, load_moekit_checkpoint, save_moekit_checkpoint
from moekit.models import LMConfig, MoETransformerLM

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_to_moekit_and_back_is_identical(family: str, dtype: torch.dtype, tmp_path) -> None:
    model = tiny_model(family).to(dtype)
    model.save_pretrained(tmp_path / "hf")  # Hub layout: one tensor per expert
    assert convert(tmp_path / "hf", tmp_path / "mk") == tmp_path / "mk"
    mk = _tensors(tmp_path / "mk")
    E, F, D = 4 if family == "mixtral" else 8, 48 if family == "mixtral" else 24, 32
    assert mk["blocks.0.ffn.experts.gate_up_proj"].shape == (E, 2 * F, D)
    assert mk["blocks.0.ffn.experts.down_proj"].shape == (E, D, F)
    assert all(t.dtype == dtype for t in mk.values())
    convert(tmp_path / "mk", tmp_path / "back", to="hf")
    _assert_same_tensors(_tensors(tmp_path / "hf"), _tensors(tmp_path / "back"))
    for name in ("config.json", "generation_config.json"):
        want = json.loads((tmp_path / "hf" / name).read_text())
        assert json.loads((tmp_path / "back" / name).read_text()) == want, name
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, original(IDS).logits, rtol=0, atol=0)


def test_mixtral_checkpoint_loads_as_moekit_lm_with_the_same_logits(tmp_path) -> None:
    hf = tiny_model("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mk")
    lm = load_moekit_checkpoint(tmp_path / "mk").eval()
    assert isinstance(lm, MoETransformerLM)
    assert lm.config.num_experts == 4 and lm.config.k == 2 and lm.config.n_kv_heads == 2
    mask = torch.ones_like(IDS, dtype=torch.bool)
    with torch.no_grad():
        got = lm(IDS, attention_mask=mask).logits
        want = hf(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_qwen3_checkpoint_says_why_it_is_no_moekit_lm(tmp_path) -> None:
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mk")
    meta = json.loads((tmp_path / "mk" / "moekit_config.json").read_text())
    assert meta["lm_config"] is None and "q_norm" in meta["lm_config_note"]
    assert "blocks.0.attn.q_norm.weight" in _tensors(tmp_path / "mk")
    with pytest.raises(ValueError, match="q_norm"):
        load_moekit_checkpoint(tmp_path / "mk")


@pytest.mark.parametrize(
    "overrides, arch",
    [
        ({}, "MixtralForCausalLM"),
        ({"router": "mixtral", "n_kv_heads": 2, "tie_embeddings": False}, "MixtralForCausalLM"),
        (
            {"num_shared_experts": 2, "shared_gate": True, "moe_every": 2, "router": "qwen"},
            "Qwen2MoeForCausalLM",
        ),
    ],
)
def test_moekit_lm_exports_to_transformers(overrides: dict, arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=16, num_experts=4, **overrides)
    lm = MoETransformerLM(config).eval()
    save_moekit_checkpoint(lm, tmp_path / "mk")
    convert(tmp_path / "mk", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, lm(IDS).logits, rtol=0, atol=1e-5)
    prompt = IDS[:1, :4]
    want = lm.generate(prompt, 12, temperature=0.0)
    got = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    # ... and back to moekit: the same tensors, the same config.
    convert(tmp_path / "hf", tmp_path / "again")
    _assert_same_tensors(_tensors(tmp_path / "mk"), _tensors(tmp_path / "again"))
    assert load_moekit_checkpoint(tmp_path / "again").config == config


def test_fused_and_sharded_hf_layouts_convert(tmp_path) -> None:
    """A checkpoint with fused 3-D expert tensors, split over two shards, converts and comes back as is."""
    model = tiny_model("qwen3_moe")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    names = sorted(state)
    src = tmp_path / "hf"
    src.mkdir()
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(src / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model.config.to_json_file(src / "config.json")
    convert(src, tmp_path / "mk")
    convert(tmp_path / "mk", tmp_path / "back")
    _assert_same_tensors(state, _tensors(tmp_path / "back"))


def test_bad_inputs_fail_cleanly(tmp_path) -> None:
    tiny_model("mixtral").save_pretrained(tmp_path / "hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        convert(tmp_path / "hf", tmp_path / "full")
    with pytest.raises(ValueError, match="not a moekit checkpoint"):
        convert(tmp_path / "hf", tmp_path / "out", to="hf")
    with pytest.raises(ValueError, match="to must be"):
        convert(tmp_path / "hf", tmp_path / "out", to="gguf")
    # pickle-only weights are refused, not loaded
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="pickle"):
        convert(tmp_path / "pickle", tmp_path / "out")
    # an unknown tensor fails and leaves nothing behind (no dst, no temporary directory)
    weights = _tensors(tmp_path / "hf")
    weights["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mystery"):
        convert(tmp_path / "hf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "hf", "pickle"]
    with pytest.raises(ValueError, match="model_type 'llama'"):
        (tmp_path / "pickle" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file({"x": torch.zeros(1)}, str(tmp_path / "pickle" / "model.safetensors"))
        convert(tmp_path / "pickle", tmp_path / "out")


def test_lm_configs_without_transformers_counterpart_are_refused() -> None:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=16, num_experts=4)
    for overrides, match in (
        ({"capacity_factor": 1.25}, "capacity_factor"),
        ({"router": "expert_choice"}, "router"),
        ({"num_shared_experts": 1}, "shared_gate"),
        ({"num_experts": 0}, "dense"),
    ):
        with pytest.raises(ValueError, match=match):
            hf_config_for_lm(LMConfig(**{**base, **overrides}).to_dict())
