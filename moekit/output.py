"""What an MoE layer returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class MoEOutput:
    """Result of ``MoELayer.forward``.

    - ``output``: same shape as the input; masked and fully dropped tokens get zero MoE output.
    - ``losses``: name -> scalar tensor, unweighted (``load_balance``, ``z_loss``, router-specific ones).
    - ``aux_loss``: the weighted sum of ``losses`` with the layer's ``loss_weights``; add it to the task loss.
    - ``stats``: detached routing statistics: ``tokens_per_expert`` (E,), ``dropped_per_expert`` (E,),
      ``num_tokens``, ``dropped_share``, ``zero_expert_share``, ``experts_per_token``, ``router_entropy``,
      ``load_cv`` (0-dim tensors), plus router-specific entries.
    - ``router_logits``: (T_real, E) float32 router logits of the real tokens, or None (hash routing).
    """

    output: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    router_logits: Tensor | None = None
