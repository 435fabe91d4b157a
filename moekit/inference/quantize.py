"""Optional int8 expert weights: symmetric per-output-channel quantization (off by default).

A weight W (out, in) is stored as ``q`` int8 (out, in) and ``scale`` float32 (out,) with
``W ~= q * scale[:, None]``, ``scale = max|W_row| / 127``. Experts are dequantized right before use, so the
cache holds the int8 bytes (about a quarter of float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

QUANTIZATIONS = (None, "int8")
SCALE_SUFFIX = ".scale"


def check_quantization(quantization: str | None) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> q (out, in) int8, scale (out,) float32."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 needs a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q (out, in) int8, scale (out,) -> (out, in) in ``dtype``."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def quantize_expert(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: W}`` -> ``{name: q, name + '.scale': scale}``."""
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        out[name], out[name + SCALE_SUFFIX] = quantize_int8(w)
    return out


def dequantize_expert(tensors: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Inverse of ``quantize_expert`` (up to rounding); float tensors pass through unchanged."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        out[name] = t if scale is None else dequantize_int8(t, scale, dtype)
    return out
