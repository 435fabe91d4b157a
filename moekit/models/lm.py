"""The MoE decoder-only language model: embeddings -> pre-norm blocks -> RMSNorm -> (tied) LM head."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layer import MoELayer
from moekit.models.attention import KVCache, causal_mask, rope_cos_sin
from moekit.models.block import Block
from moekit.models.config import LMConfig
from moekit.models.generate import generate
from moekit.models.norms import RMSNorm
from moekit.output import MoEOutput

IGNORE_INDEX = -100
INIT_STD = 0.02  # GPT-2 init of weights; projections into the residual stream get INIT_STD / sqrt(2 * n_layers)


@dataclass
class LMOutput:
    """What ``MoETransformerLM.forward`` returns.

    - ``logits`` (B, L, V).
    - ``loss``: mean cross-entropy over targets != -100 (and attention_mask True), or None without targets.
    - ``aux_loss``: float32 scalar, the sum of the MoE layers' weighted auxiliary losses (0 when dense).
    - ``moe_outputs``: one ``MoEOutput`` per MoE layer, in layer order (empty for a dense model).
    - ``total_loss``: ``loss + aux_loss``, or None without targets.
    """

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    moe_outputs: list[MoEOutput] = field(default_factory=list)

    @property
    def total_loss(self) -> Tensor | None:
        return None if self.loss is None else self.loss + self.aux_loss


class MoETransformerLM(nn.Module):
    """Decoder-only Transformer (RoPE, RMSNorm, GQA) with ``MoELayer`` FFNs (every ``moe_every`` layers)."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = INIT_STD) -> None:
        """GPT-2 init: normal(0, std) weights, ``std / sqrt(2 * n_layers)`` for projections into the residual
        stream, RMSNorm gains 1. Routers keep their own initialisation."""
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            block.reset_parameters(std, out_std)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> LMOutput:
        """idx (B, L) int64 token ids; targets (B, L) (-100 = ignore); attention_mask (B, L) bool, True = real
        token (padding is masked as attention keys, gets no MoE routing and no loss).

        With ``kv_cache``, idx holds the positions ``start_pos .. start_pos + L - 1`` and attends to the
        cached ones before them.
        """
        B, L = self._check_inputs(idx, targets, attention_mask, kv_cache, start_pos)
        positions = torch.arange(start_pos, start_pos + L, device=idx.device)  # (L,)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)  # (L, Dh) each

        key_mask = attention_mask  # (B, S) real keys, S = L without a cache
        if kv_cache is not None:
            key_mask = kv_cache.update_key_mask(attention_mask, start_pos, L)  # (B, start_pos + L) or None
        key_len = start_pos + L if kv_cache is not None else L
        attn_mask = None  # plain causal attention
        if key_mask is not None:
            attn_mask = causal_mask(key_len, L, key_mask, idx.device)  # (B, 1, L, S)

        x = self.tok_embeddings(idx)  # (B, L, D)
        moe_outputs: list[MoEOutput] = []
        for i, block in enumerate(self.blocks):
            cache = kv_cache.layers[i] if kv_cache is not None else None
            x, moe_out = block(x, cos, sin, attn_mask, attention_mask, idx, cache, start_pos)  # (B, L, D)
            if moe_out is not None:
                moe_outputs.append(moe_out)
        logits = self.lm_head(self.norm(x))  # (B, L, V)

        aux_loss = logits.new_zeros((), dtype=torch.float32)
        for out in moe_outputs:
            if out.aux_loss is not None:
                aux_loss = aux_loss + out.aux_loss.float()
        loss = None
        if targets is not None:
            loss = self._lm_loss(logits, targets, attention_mask)
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss, moe_outputs=moe_outputs)

    @staticmethod
    def _lm_loss(logits: Tensor, targets: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Mean float32 cross-entropy over the kept targets; 0 (not NaN) when none is kept."""
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask, IGNORE_INDEX)  # (B, L)
        flat_targets = targets.reshape(-1)  # (B*L,)
        summed = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            flat_targets,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return summed / (flat_targets != IGNORE_INDEX).sum().clamp_min(1)

    def _check_inputs(
        self,
        idx: Tensor,
        targets: Tensor | None,
        attention_mask: Tensor | None,
        kv_cache: KVCache | None,
        start_pos: int,
    ) -> tuple[int, int]:
        if not isinstance(idx, Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (B, L) tensor, got {getattr(idx, 'shape', type(idx).__name__)}")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"idx must be an integer tensor, got dtype {idx.dtype}")
        B, L = idx.shape
        if L < 1:
            raise ValueError("idx must hold at least one position (L >= 1)")
        if targets is not None and (not isinstance(targets, Tensor) or targets.shape != idx.shape):
            raise ValueError(
                f"targets must have the shape of idx {tuple(idx.shape)}, got {getattr(targets, 'shape', targets)}"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.dtype != torch.bool:
                raise ValueError("attention_mask must be a bool tensor (True = real token)")
            if attention_mask.shape != idx.shape:
                raise ValueError(
                    f"attention_mask must have the shape of idx {tuple(idx.shape)}, got {tuple(attention_mask.shape)}"
                )
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an int >= 0, got {start_pos!r}")
        if start_pos + L > self.config.max_seq_len:
            raise ValueError(f"start_pos + L = {start_pos + L} exceeds max_seq_len={self.config.max_seq_len}")
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache was made for batch size {kv_cache.batch_size}, idx has {B}")
            if start_pos + L > kv_cache.max_len:
                raise ValueError(f"start_pos + L = {start_pos + L} exceeds the kv_cache length {kv_cache.max_len}")
            if len(kv_cache.layers) != len(self.blocks):
                raise ValueError(f"kv_cache has {len(kv_cache.layers)} layers, the model {len(self.blocks)}")
        return B, L

    # ------------------------------------------------------------------ decoding
    def init_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` (default: max_seq_len)
        positions, on the model's device and in its dtype."""
        cfg = self.config
        max_len = cfg.max_seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be an int in [1, max_seq_len={cfg.max_seq_len}], got {max_len!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        weight = self.tok_embeddings.weight
        return KVCache(
            cfg.n_layers,
            batch_size,
            cfg.kv_heads,
            cfg.head_dim,
            max_len,
            device=weight.device,
            dtype=weight.dtype,
        )

    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Sample a continuation of idx (1, L) -> (1, L + max_new_tokens); see ``moekit.models.generate``."""
        return generate(self, idx, max_new_tokens, temperature, top_p, seed, stream)

    # ------------------------------------------------------------------ MoE hooks and accounting
    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """(name, layer) of every MoE FFN in layer order; names as in ``named_modules()``."""
        return [(f"blocks.{i}.ffn", b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)]

    def num_experts_per_layer(self) -> dict[str, int]:
        """Current E of every MoE layer (name -> E); differs from ``config.num_experts`` after DynMoE changes."""
        return {name: layer.num_experts for name, layer in self.moe_layers()}

    def _moe_layer(self, name: str) -> MoELayer:
        layers = dict(self.moe_layers())
        if name not in layers:
            raise ValueError(f"layer must be one of the MoE layers {sorted(layers)}, got {name!r}")
        return layers[name]

    @torch.no_grad()
    def add_expert(self, layer: str) -> int:
        """Append an expert to MoE layer ``layer`` (DynMoE), initialised like the model's other experts.
        Parameters are replaced: rebuild the optimizer afterwards. Returns the new expert's index."""
        moe = self._moe_layer(layer)
        idx = moe.add_expert()
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        # GroupedFFN.add_expert uses a 1/sqrt(fan_in) init; re-draw it as in reset_parameters so a new expert
        # starts on the same scale as the others.
        nn.init.normal_(moe.experts.in_proj[idx], std=INIT_STD)
        nn.init.normal_(moe.experts.down_proj[idx], std=out_std)
        return idx

    def remove_expert(self, layer: str, e: int) -> None:
        """Delete expert ``e`` of MoE layer ``layer`` (DynMoE); later experts shift down. Rebuild the
        optimizer afterwards."""
        self._moe_layer(layer).remove_expert(e)

    def resize_experts(self, counts: dict[str, int]) -> bool:
        """Give each named MoE layer ``counts[name]`` experts by adding or removing at the end (values are
        meant to be overwritten by a checkpoint load). Returns True when any layer changed."""
        if not isinstance(counts, dict):
            raise ValueError(f"counts must be a dict of MoE layer name -> num_experts, got {type(counts).__name__}")
        layers = dict(self.moe_layers())
        if set(counts) != set(layers):
            raise ValueError(f"counts must name exactly the MoE layers {sorted(layers)}, got {sorted(counts)}")
        changed = False
        for name, target in counts.items():
            if isinstance(target, bool) or not isinstance(target, int) or target < 1:
                raise ValueError(f"counts[{name!r}] must be an int >= 1, got {target!r}")
            moe = layers[name]
            while moe.num_experts < target:
                moe.add_expert()
                changed = True
            while moe.num_experts > target:
                moe.remove_expert(moe.num_experts - 1)
                changed = True
        return changed

    def after_optimizer_step(self) -> None:
        """Call after each optimizer step: runs each MoE layer's between-steps hook (aux-loss-free bias,
        DynMoE)."""
        for _, layer in self.moe_layers():
            layer.after_optimizer_step()

    def param_counts(self) -> dict[str, int]:
        """``total`` parameters (tied embeddings counted once) and ``active`` ones per token.

        Active = everything except the experts a token does not use: per MoE layer, ``num_experts - k``
        experts' weights are subtracted. Router weights, shared experts, attention, norms and the embeddings
        count as active (every token uses them). For routers with a variable number of experts per token
        (top-p, DynMoE) ``k`` is the configured one; for expert choice it is the average experts per token.
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        inactive = 0
        for _, layer in self.moe_layers():
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
            inactive += max(0, layer.num_experts - layer.k) * per_expert  # E may shrink below k (DynMoE)
        return {"total": total, "active": total - inactive}

    def describe(self) -> str:
        """A few human-readable lines: architecture, MoE setup and parameter counts."""
        cfg = self.config
        n_moe = len(self.moe_layers())
        counts = self.param_counts()
        lines = [
            f"MoETransformerLM: {cfg.n_layers} layers ({n_moe} MoE, {cfg.n_layers - n_moe} dense), "
            f"d_model={cfg.d_model}, heads={cfg.n_heads} (kv {cfg.kv_heads}), vocab={cfg.vocab_size}, "
            f"max_seq_len={cfg.max_seq_len}, tied embeddings={cfg.tie_embeddings}"
        ]
        if n_moe:
            capacity = "dropless" if cfg.capacity_factor is None else f"capacity factor {cfg.capacity_factor}"
            per_layer = sorted(set(self.num_experts_per_layer().values()))
            experts = str(cfg.num_experts) if per_layer == [cfg.num_experts] else "/".join(map(str, per_layer))
            lines.append(
                f"MoE: router={cfg.router}, {experts} experts of width {cfg.d_ff}, k={cfg.k}, "
                f"{cfg.num_shared_experts} shared, {capacity}, every {cfg.moe_every} layer(s)"
            )
        if n_moe < cfg.n_layers:
            lines.append(f"dense FFN: SwiGLU of width {cfg.dense_width}")
        lines.append(
            f"params: total {counts['total']:,} | active per token {counts['active']:,} "
            f"({counts['active'] / counts['total']:.1%})"
        )
        return "\n".join(lines)
