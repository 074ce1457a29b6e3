"""Rotary position embedding (rotate-half / NeoX layout, as Llama) with a cos/sin cache.

Scaling types: none ("default"), "linear" (positions divided by factor) and "llama3"
(frequency-dependent: long wavelengths divided by factor, short kept, a smooth ramp between).
"""

from __future__ import annotations

import math

import torch

from batonserve.kernels.cpu import small_ops
from batonserve.kernels.rope_scaling import SUPPORTED_ROPE_TYPES, RopeScaling

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "RopeScaling",
    "apply_rope",
    "rope_cos_sin",
    "rope_cos_sin_cache",
    "rope_inv_freq",
]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32, after scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        # Long wavelengths (> low_wavelen) are slowed by `factor`; short ones (< high_wavelen) kept.
        scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, blended, scaled)
    raise ValueError(
        f"rope_scaling.rope_type: unsupported {scaling.rope_type!r}; "
        f"supported: {list(SUPPORTED_ROPE_TYPES)}"
    )


def rope_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    theta: float,
    scaling: RopeScaling | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) caches [max_positions, head_dim] float32, each half repeated (rotate-half layout)."""
    inv = rope_inv_freq(head_dim, theta, scaling)
    pos = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = pos[:, None] * inv[None, :]  # [P, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, d]
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, d] by per-token cos/sin [T, d] (already gathered at the positions)."""
    if x.dim() == 3 and x.shape[-1] % 2 == 0 and small_ops.usable(x, cos, sin):
        return small_ops.rope(x, cos, sin)  # one C pass, the same roundings as below
    half = x.shape[-1] // 2
    c = cos[:, None, :].to(x.dtype)
    s = sin[:, None, :].to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, head_dim] float32 at `positions` [T]: the per-forward slice of the cache."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()
