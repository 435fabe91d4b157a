"""One pre-norm Transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; FFN is MoE or dense."""

from __future__ import annotations

from torch import Tensor, nn

from moekit.experts.grouped import GroupedFFN
from moekit.layer import MoELayer
from moekit.models.attention import CausalSelfAttention, LayerKVCache
from moekit.models.config import LMConfig
from moekit.models.ffn import SwiGLU
from moekit.models.norms import RMSNorm
from moekit.output import MoEOutput


class Block(nn.Module):
    """Pre-norm attention + FFN block. The FFN is an ``MoELayer`` when ``config.is_moe_layer(layer_idx)``,
    else a dense ``SwiGLU`` of width ``config.dense_width``."""

    def __init__(self, config: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, config.kv_heads)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn: MoELayer | SwiGLU
        if self.is_moe:
            self.ffn = MoELayer(
                config.d_model,
                config.d_ff,
                config.num_experts,
                k=config.k,
                router=config.router,
                capacity_factor=config.capacity_factor,
                num_shared_experts=config.num_shared_experts,
                shared_gate=config.shared_gate,
                router_options=config.router_options,
                loss_weights=config.loss_weights,
            )
        else:
            self.ffn = SwiGLU(config.d_model, config.dense_width)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None = None,
        token_mask: Tensor | None = None,
        token_ids: Tensor | None = None,
        cache: LayerKVCache | None = None,
        start_pos: int = 0,
    ) -> tuple[Tensor, MoEOutput | None]:
        """x (B, L, D) -> (B, L, D) and the MoE layer's output (None for a dense block).

        ``attn_mask`` goes to attention (see ``CausalSelfAttention``); ``token_mask`` (B, L) bool (True = real
        token) and ``token_ids`` (B, L) go to the MoE layer, which routes only the real tokens.
        """
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache, start_pos)  # (B, L, D)
        h = self.ffn_norm(x)  # (B, L, D)
        if isinstance(self.ffn, MoELayer):
            moe_out = self.ffn(h, mask=token_mask, token_ids=token_ids)
            return x + moe_out.output, moe_out
        return x + self.ffn(h), None

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal init of attention and FFN weights (``out_std`` for projections into the residual stream).

        MoE experts get the same init as the dense FFN, so MoE and dense baselines start alike; routers keep
        their own initialisation.
        """
        self.attn.reset_parameters(std, out_std)
        if isinstance(self.ffn, SwiGLU):
            self.ffn.reset_parameters(std, out_std)
            return
        if isinstance(self.ffn.experts, GroupedFFN):
            nn.init.normal_(self.ffn.experts.in_proj, std=std)
            nn.init.normal_(self.ffn.experts.down_proj, std=out_std)
        shared = self.ffn.shared
        if shared is not None:
            nn.init.normal_(shared.gate_proj.weight, std=std)
            nn.init.normal_(shared.up_proj.weight, std=std)
            nn.init.normal_(shared.down_proj.weight, std=out_std)
            if shared.shared_expert_gate is not None:
                nn.init.normal_(shared.shared_expert_gate.weight, std=std)
