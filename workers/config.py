"""Per-worker engine configuration (the cluster config embeds it as its `engine` section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EngineConfig:
    """Per-worker engine limits (the machine-level scheduler and the KV cache)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    block_size: int = 16
    num_kv_blocks: int = 0  # 0 sizes the cache from kv_cache_bytes
    kv_cache_bytes: int = 256 * 1024 * 1024
    max_num_batched_tokens: int = 2048  # Splitwise's prefill batch cap
    max_num_seqs: int = 64
    max_model_len: int = 0  # 0 takes the model's context length
    enable_prefix_caching: bool = True
    seed: int = 0
