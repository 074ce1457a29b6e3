"""The parsed `rope_scaling` settings (no torch: model configs are read by the router too)."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """A parsed `rope_scaling` block (only the fields the supported types use)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
