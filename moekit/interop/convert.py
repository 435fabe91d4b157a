"""Checkpoint conversion between Hugging Face MoE checkpoints and moekit checkpoints, both ways.

A **moekit checkpoint** is a directory with

- ``model.safetensors``: tensors under moekit's names, i.e. ``MoETransformerLM``'s state-dict names
  (``blocks.{i}.ffn.experts.gate_up_proj`` (E, 2F, D), ``blocks.{i}.ffn.router.weight`` ...; a tied
  ``lm_head.weight`` is not stored), plus family extras under the same scheme (Qwen3's
  ``blocks.{i}.attn.q_norm.weight``);
- ``moekit_config.json``: ``{"format": "moekit", "format_version": 1, "lm_config": LMConfig dict or null,
  "lm_config_note": why null, "hf": null or {"model_type", "config" (the HF config.json, verbatim),
  "expert_layout" ("per_expert" | "fused"), "moe_block", "files"}}``;
- ``hf_files/``: the HF directory's other files (tokenizer, generation config), kept for the way back.

``lm_config`` is set when ``MoETransformerLM`` computes exactly the checkpoint's function (Mixtral, and
checkpoints exported from moekit); then ``load_moekit_checkpoint`` returns the model. Qwen3-MoE has
per-head query/key RMSNorm, which moekit's LM lacks: its moekit checkpoint converts back losslessly but does
not load as an ``MoETransformerLM``.

HF formats: Mixtral (``block_sparse_moe.experts.{e}.w1/w3/w2``), Qwen2-MoE and Qwen3-MoE
(``mlp.experts.{e}.gate_proj/up_proj/down_proj``), per-expert as on the Hub and as ``save_pretrained`` writes,
or fused 3-D (``mlp.experts.gate_up_proj``). HF -> moekit -> HF gives identical tensors and config. A moekit
LM goes to Mixtral (no shared experts, every layer MoE, renormalised top-k) or to Qwen2-MoE (gated shared
experts, dense layers and plain top-k allowed) and loads with ``AutoModelForCausalLM.from_pretrained``.

Only safetensors and JSON are read; every output directory is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moekit.interop.registry import family_for_model_type

FORMAT_VERSION = 1
MOEKIT_CONFIG = "moekit_config.json"
WEIGHTS = "model.safetensors"
HF_FILES = "hf_files"
CONVERTIBLE = ("mixtral", "qwen2_moe", "qwen3_moe")
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Inside one decoder layer: transformers name -> moekit name ("{moe}" is the family's MoE block name).
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.out_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",  # Qwen2-MoE (qkv_bias)
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight",  # Qwen3-MoE
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",  # dense layers
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
    "{moe}.gate.weight": "ffn.router.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn.shared.gate_proj.weight",  # Qwen2-MoE
    "mlp.shared_expert.up_proj.weight": "ffn.shared.up_proj.weight",
    "mlp.shared_expert.down_proj.weight": "ffn.shared.down_proj.weight",
    "mlp.shared_expert_gate.weight": "ffn.shared.shared_expert_gate.weight",
}


# ---------------------------------------------------------------------------------------------- public API


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None) -> Path:
    """Convert checkpoint directory ``src`` into a new directory ``dst``; returns ``dst``.

    ``to="moekit"``: ``src`` is an HF checkpoint (``config.json`` + safetensors). ``to="hf"``: ``src`` is a
    moekit checkpoint (``moekit_config.json``). ``to=None`` picks the other format of ``src``. ``dst`` must
    not exist or be an empty directory.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"src {str(src)!r} is not a directory")
    is_moekit = (src / MOEKIT_CONFIG).is_file()
    if to is None:
        to = "hf" if is_moekit else "moekit"
    if to not in ("hf", "moekit"):
        raise ValueError(f"to must be 'hf', 'moekit' or None, got {to!r}")
    if to == "hf":
        if not is_moekit:
            raise ValueError(f"src {str(src)!r} is not a moekit checkpoint (no {MOEKIT_CONFIG})")
        return _moekit_to_hf_dir(src, dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"src {str(src)!r} is not a Hugging Face checkpoint (no config.json)")
    return _hf_to_moekit_dir(src, dst)


def save_moekit_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write a ``MoETransformerLM`` as a moekit checkpoint directory ``path`` (new or empty)."""
    from moekit.models import MoETransformerLM

    if not isinstance(model, MoETransformerLM):
        raise TypeError(f"model must be a MoETransformerLM, got {type(model).__name__}")
    tensors = {name: t.detach() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    meta = {
        "format": "moekit",
        "format_version": FORMAT_VERSION,
        "lm_config": model.config.to_dict(),
        "hf": None,
    }
    with _atomic_dir(Path(path)) as tmp:
        _write_weights(tmp / WEIGHTS, tensors)
        _write_json(tmp / MOEKIT_CONFIG, meta)
    return Path(path)


def load_moekit_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """A ``MoETransformerLM`` from a moekit checkpoint directory, in the checkpoint's dtype.

    Raises ValueError (with the reason) when ``MoETransformerLM`` does not compute the checkpoint's function.
    """
    from moekit.models import LMConfig, MoETransformerLM

    path = Path(path)
    meta = _read_moekit_meta(path)
    if meta.get("lm_config") is None:
        note = meta.get("lm_config_note") or "no lm_config"
        raise ValueError(f"moekit checkpoint {str(path)!r} does not load as a MoETransformerLM: {note}")
    config = LMConfig.from_dict(meta["lm_config"])
    tensors = _read_weights([path / WEIGHTS], map_location)
    model = MoETransformerLM(config)
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    if floats:
        model.to(device=map_location, dtype=floats[0])
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"moekit checkpoint {str(path)!r}: missing tensors {missing}, unexpected {unexpected}")
    model.load_state_dict(tensors, strict=False)
    return model


# ---------------------------------------------------------------------------------------------- HF -> moekit


def _hf_to_moekit_dir(src: Path, dst: Path) -> Path:
    hf_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    model_type = hf_config.get("model_type")
    if model_type not in CONVERTIBLE:
        raise ValueError(f"model_type {model_type!r} cannot be converted; supported: {list(CONVERTIBLE)}")
    tensors = _read_weights(_hf_weight_files(src))
    moe_block = "block_sparse_moe" if any(".block_sparse_moe." in n for n in tensors) else "mlp"
    ours, layout = hf_to_moekit_tensors(tensors, model_type, moe_block)
    lm_config, note = _lm_config_for(hf_config)
    extra = _extra_files(src)
    meta = {
        "format": "moekit",
        "format_version": FORMAT_VERSION,
        "lm_config": lm_config,
        "lm_config_note": note,
        "hf": {
            "model_type": model_type,
            "config": hf_config,
            "expert_layout": layout,
            "moe_block": moe_block,
            "files": [p.name for p in extra],
        },
    }
    with _atomic_dir(dst) as tmp:
        _write_weights(tmp / WEIGHTS, ours)
        _write_json(tmp / MOEKIT_CONFIG, meta)
        if extra:
            (tmp / HF_FILES).mkdir()
            for p in extra:
                shutil.copy2(p, tmp / HF_FILES / p.name)
    return dst


def hf_to_moekit_tensors(
    tensors: dict[str, Tensor], model_type: str, moe_block: str = "mlp"
) -> tuple[dict[str, Tensor], str]:
    """Rename (and stack per-expert) HF tensors to moekit names; returns them and the expert layout found."""
    names = _expert_names(model_type)
    layer_rules = {k.replace("{moe}", moe_block): v for k, v in _LAYER.items()}
    expert_re = re.compile(rf"{re.escape(moe_block)}\.experts\.(\d+)\.(\w+)\.weight")
    out: dict[str, Tensor] = {}
    per_expert: dict[int, dict[int, dict[int, Tensor]]] = {}  # layer -> expert -> role -> (out, in)
    layouts = set()
    for name, t in tensors.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"{model_type} checkpoint: unknown tensor {name!r}")
        i, rest = int(m[1]), m[2]
        em = expert_re.fullmatch(rest)
        if em is not None and em[2] in names:
            per_expert.setdefault(i, {}).setdefault(int(em[1]), {})[names.index(em[2])] = t
            layouts.add("per_expert")
        elif rest in (f"{moe_block}.experts.gate_up_proj", f"{moe_block}.experts.down_proj"):
            out[f"blocks.{i}.ffn.experts.{rest.rsplit('.', 1)[1]}"] = t
            layouts.add("fused")
        elif rest in layer_rules:
            out[f"blocks.{i}.{layer_rules[rest]}"] = t
        else:
            raise ValueError(f"{model_type} checkpoint: unknown tensor {name!r}")
    if len(layouts) > 1:
        raise ValueError(f"{model_type} checkpoint mixes per-expert and fused expert tensors")
    for i, experts in per_expert.items():
        E = len(experts)
        if sorted(experts) != list(range(E)) or any(len(roles) != 3 for roles in experts.values()):
            raise ValueError(f"{model_type} checkpoint: layer {i} has an incomplete set of expert tensors")
        gate_up = [torch.cat([experts[e][0], experts[e][1]], dim=0) for e in range(E)]  # (2F, D) each
        out[f"blocks.{i}.ffn.experts.gate_up_proj"] = torch.stack(gate_up)  # (E, 2F, D)
        out[f"blocks.{i}.ffn.experts.down_proj"] = torch.stack([experts[e][2] for e in range(E)])  # (E, D, F)
    return out, (layouts.pop() if layouts else "per_expert")


def _lm_config_for(hf_config: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The LMConfig dict of a checkpoint ``MoETransformerLM`` computes exactly, else (None, reason)."""
    from moekit.models import LMConfig

    if "moekit_lm_config" in hf_config:  # exported by moekit: the original config, losslessly
        return LMConfig.from_dict(hf_config["moekit_lm_config"]).to_dict(), ""
    model_type = hf_config["model_type"]
    if model_type == "qwen3_moe":
        return None, "qwen3_moe normalises queries and keys per head (q_norm/k_norm); moekit's LM does not"
    if model_type != "mixtral":
        return None, f"{model_type} checkpoints load as a MoETransformerLM only when moekit exported them"
    from transformers import MixtralConfig

    cfg = MixtralConfig.from_dict(hf_config)
    rope = dict(cfg.rope_parameters or {})
    problems = []
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (moekit: silu)")
    if getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // cfg.num_attention_heads):
        problems.append(f"head_dim={cfg.head_dim} != hidden_size / num_attention_heads")
    if cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window} (moekit: full attention)")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (moekit: default RoPE)")
    if problems:
        return None, "mixtral config with " + ", ".join(problems)
    config = LMConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        max_seq_len=cfg.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 1e6)),
        d_ff=cfg.intermediate_size,
        num_experts=cfg.num_local_experts,
        k=cfg.num_experts_per_tok,
        router="topk",
        tie_embeddings=bool(cfg.tie_word_embeddings),
        norm_eps=float(cfg.rms_norm_eps),
    )
    return config.to_dict(), ""


# ---------------------------------------------------------------------------------------------- moekit -> HF


def _moekit_to_hf_dir(src: Path, dst: Path) -> Path:
    meta = _read_moekit_meta(src)
    tensors = _read_weights([src / WEIGHTS])
    source = meta.get("hf")
    if source is not None:
        hf_config = source["config"]
        model_type, layout, moe_block = source["model_type"], source["expert_layout"], source["moe_block"]
        files = [src / HF_FILES / name for name in source.get("files", [])]
    else:
        if meta.get("lm_config") is None:
            raise ValueError(f"moekit checkpoint {str(src)!r} has neither an lm_config nor an HF source")
        hf_config = hf_config_for_lm(meta["lm_config"])
        model_type, layout, files = hf_config["model_type"], "per_expert", []
        moe_block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    hf_tensors = moekit_to_hf_tensors(tensors, model_type, moe_block, layout)
    with _atomic_dir(dst) as tmp:
        _write_weights(tmp / WEIGHTS, hf_tensors)
        _write_json(tmp / "config.json", hf_config)
        for p in files:
            shutil.copy2(p, tmp / p.name)
    return dst


def moekit_to_hf_tensors(
    tensors: dict[str, Tensor], model_type: str, moe_block: str = "mlp", layout: str = "per_expert"
) -> dict[str, Tensor]:
    """Inverse of ``hf_to_moekit_tensors``: moekit names -> HF names (experts split per expert or fused)."""
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    gate_name, up_name, down_name = _expert_names(model_type)
    top = {v: k for k, v in _TOP.items()}
    layer_rules = {v: k.replace("{moe}", moe_block) for k, v in _LAYER.items()}
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name in top:
            out[top[name]] = t
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"moekit checkpoint: unknown tensor {name!r}")
        i, rest = int(m[1]), m[2]
        prefix = f"model.layers.{i}."
        if rest in ("ffn.experts.gate_up_proj", "ffn.experts.down_proj"):
            proj = rest.rsplit(".", 1)[1]
            if layout == "fused":
                out[f"{prefix}{moe_block}.experts.{proj}"] = t
                continue
            for e in range(t.shape[0]):
                base = f"{prefix}{moe_block}.experts.{e}."
                if proj == "down_proj":
                    out[base + f"{down_name}.weight"] = t[e].contiguous()
                else:
                    d_ff = t.shape[1] // 2
                    out[base + f"{gate_name}.weight"] = t[e, :d_ff].contiguous()
                    out[base + f"{up_name}.weight"] = t[e, d_ff:].contiguous()
        elif rest in layer_rules:
            out[prefix + layer_rules[rest]] = t
        else:
            raise ValueError(f"moekit checkpoint: tensor {name!r} has no {model_type} counterpart")
    return out


def hf_config_for_lm(lm_config: dict[str, Any]) -> dict[str, Any]:
    """The transformers config (as a dict) of the HF model computing what an ``MoETransformerLM`` computes.

    Mixtral when the LM has no shared experts, an MoE FFN in every layer and renormalised top-k; Qwen2-MoE
    when it has gated shared experts (dense layers and plain top-k allowed). Anything else raises ValueError
    naming the field. The LM config rides along as ``moekit_lm_config`` (transformers keeps unknown keys).
    """
    from moekit.models import LMConfig

    cfg = LMConfig.from_dict(lm_config)
    if cfg.num_experts == 0:
        raise ValueError("LMConfig.num_experts=0: a dense model has no transformers MoE counterpart here")
    if cfg.capacity_factor is not None:
        raise ValueError(f"LMConfig.capacity_factor={cfg.capacity_factor}: transformers' MoE blocks are dropless")
    options = dict(cfg.router_options)
    if cfg.router in ("topk", "mixtral"):
        unknown = set(options) - {"order", "renormalize"}
        renormalize = options.get("renormalize", True) or options.get("order") == "topk_then_softmax"
        renormalize = renormalize or cfg.router == "mixtral"
    elif cfg.router in ("qwen", "olmoe"):
        unknown = set(options) - {"renormalize"}
        renormalize = options.get("renormalize", False)
    else:
        raise ValueError(f"LMConfig.router={cfg.router!r} has no transformers counterpart (topk/mixtral/qwen/olmoe)")
    if unknown:
        raise ValueError(f"LMConfig.router_options {sorted(unknown)} have no transformers counterpart")
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts_per_tok=cfg.k,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if cfg.num_shared_experts == 0 and cfg.moe_every == 1 and renormalize:
        from transformers import MixtralConfig

        hf = MixtralConfig(**common, intermediate_size=cfg.d_ff, num_local_experts=cfg.num_experts)
        arch = "MixtralForCausalLM"
    elif cfg.num_shared_experts > 0 and cfg.shared_gate:
        from transformers import Qwen2MoeConfig

        hf = Qwen2MoeConfig(
            **common,
            intermediate_size=cfg.dense_width,
            moe_intermediate_size=cfg.d_ff,
            shared_expert_intermediate_size=cfg.num_shared_experts * cfg.d_ff,
            num_experts=cfg.num_experts,
            norm_topk_prob=bool(renormalize),
            decoder_sparse_step=cfg.moe_every,
            mlp_only_layers=[],
            qkv_bias=False,
        )
        arch = "Qwen2MoeForCausalLM"
    else:
        raise ValueError(
            "no transformers MoE architecture computes this LMConfig: Mixtral needs num_shared_experts=0, "
            "moe_every=1 and renormalised top-k; Qwen2-MoE needs shared experts with shared_gate=True "
            f"(got num_shared_experts={cfg.num_shared_experts}, shared_gate={cfg.shared_gate}, "
            f"moe_every={cfg.moe_every}, router={cfg.router!r})"
        )
    out = hf.to_dict()
    out["architectures"] = [arch]
    out["moekit_lm_config"] = cfg.to_dict()
    return out


# ---------------------------------------------------------------------------------------------- files


def _expert_names(model_type: str) -> tuple[str, str, str]:
    family = family_for_model_type(model_type)
    if family is None or model_type not in CONVERTIBLE:
        raise ValueError(f"model_type {model_type!r} cannot be converted; supported: {list(CONVERTIBLE)}")
    return family.checkpoint_experts


def _hf_weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [src / name for name in sorted(set(weight_map.values()))]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        unsafe = [p.name for p in src.iterdir() if p.suffix in _UNSAFE_SUFFIXES]
        hint = f" (found {unsafe}: pickle-based weights are not loaded, convert them to safetensors)" if unsafe else ""
        raise ValueError(f"no .safetensors weights in {str(src)!r}{hint}")
    return files


def _extra_files(src: Path) -> list[Path]:
    """Files of an HF directory that are neither its config nor its weights (tokenizer, generation config)."""
    skip = {"config.json", "model.safetensors.index.json"}
    return sorted(
        p
        for p in src.iterdir()
        if p.is_file() and p.name not in skip and p.suffix != ".safetensors" and p.suffix not in _UNSAFE_SUFFIXES
    )


def _read_moekit_meta(path: Path) -> dict[str, Any]:
    file = path / MOEKIT_CONFIG
    if not file.is_file():
        raise ValueError(f"{str(path)!r} is not a moekit checkpoint (no {MOEKIT_CONFIG})")
    meta = json.loads(file.read_text(encoding="utf-8"))
    if meta.get("format") != "moekit" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(file)!r}: expected format 'moekit' version {FORMAT_VERSION}, "
            f"got {meta.get('format')!r} version {meta.get('format_version')!r}"
        )
    return meta


def _read_weights(files: list[Path], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"weights file {str(file)!r} does not exist")
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"tensor {name!r} appears in more than one weights file")
                tensors[name] = f.get_tensor(name)
    return tensors


def _write_weights(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


@contextmanager
def _atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``dst``, on error remove it."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"dst {str(dst)!r} exists and is not an empty directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
