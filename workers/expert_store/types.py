"""Typed objects of the tiered expert store: keys, weights, config and stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

from batonserve.workers.models.config import DTYPES

if TYPE_CHECKING:
    import torch

TierName = Literal["gpu", "ram", "disk"]


class ExpertKey(NamedTuple):
    """One expert of one MoE layer."""

    layer: int
    expert: int


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's SwiGLU weights in the model's layout (gate rows first, then up)."""

    w_gate_up: torch.Tensor  # [2I, D]
    w_down: torch.Tensor  # [D, I]

    @property
    def nbytes(self) -> int:
        """Bytes held by both tensors."""
        return int(
            self.w_gate_up.numel() * self.w_gate_up.element_size()
            + self.w_down.numel() * self.w_down.element_size()
        )


@dataclass(frozen=True)
class StoreConfig:
    """How the store is tiered, sized and filled."""

    fast_budget_bytes: int  # byte budget of the compute tier (RAM on CPU, GPU memory on CUDA)
    policy: str = "lru"  # a name in the cache-policy registry
    prefetch: bool = False  # prefetch the predictor's forecasts in the background
    prefetch_top_m: int = 2  # experts prefetched per token and forecast layer
    prefetch_bandwidth_bytes_per_s: float = 0.0  # 0 = unlimited (demand loads always preempt)
    # prefetch planned at fixed points of the forward, only reads in the background: residency
    # depends on the demand sequence alone (tensor-parallel ranks must agree); see planned_reads.py
    prefetch_lockstep: bool = False
    ram_budget_bytes: int = 0  # second-level RAM tier when the compute tier is a GPU (0 = none)
    drop_page_cache: bool = False  # fadvise(DONTNEED) after each read: every disk read is cold
    disk_reader: str = "pread"  # "pread" (byte ranges) or "safe_open" (safetensors slices)
    device: str = "cpu"
    dtype: str = "float16"
    # [start, stop) of every expert's intermediate width this store holds: a tensor-parallel
    # rank's share (gate/up rows, down columns); None = whole experts
    expert_slice: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.fast_budget_bytes < 0:
            raise ValueError(f"fast_budget_bytes: must be >= 0, got {self.fast_budget_bytes}")
        if self.ram_budget_bytes < 0:
            raise ValueError(f"ram_budget_bytes: must be >= 0, got {self.ram_budget_bytes}")
        if self.prefetch_top_m < 1:
            raise ValueError(f"prefetch_top_m: must be >= 1, got {self.prefetch_top_m}")
        if self.prefetch_bandwidth_bytes_per_s < 0:
            raise ValueError(
                "prefetch_bandwidth_bytes_per_s: must be >= 0, got "
                f"{self.prefetch_bandwidth_bytes_per_s}"
            )
        if self.expert_slice is not None and not 0 <= self.expert_slice[0] < self.expert_slice[1]:
            raise ValueError(
                f"expert_slice: must be [start, stop) with start < stop, got {self.expert_slice}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {list(DTYPES)}, got {self.dtype!r}")


@dataclass
class TierStats:
    """Counters of one tier."""

    hits: int = 0
    misses: int = 0
    bytes_in: int = 0  # bytes copied into this tier
    evictions: int = 0


@dataclass
class ExpertStoreStats:
    """What the store saw since the last reset (the metrics module names and exports these)."""

    num_layers: int
    num_experts: int
    tiers: dict[TierName, TierStats] = field(default_factory=dict)
    expert_load: list[list[int]] = field(
        default_factory=list
    )  # [layer][expert] routed token copies
    expert_hits: list[list[int]] = field(default_factory=list)  # [layer][expert] fast-tier hits
    expert_misses: list[list[int]] = field(default_factory=list)  # [layer][expert] fast-tier misses
    # demand found its expert still being prefetched (counted as a miss); lockstep: a layer waited
    # for a planned read (its expert counts as resident: hit or not depends on no timing)
    late_prefetch: int = 0
    prefetch_issued: int = 0  # prefetch loads completed into the fast tier (lockstep: planned)
    prefetch_used: int = 0  # of those, demanded before eviction (precision numerator)
    prefetch_dropped: int = 0  # forecasts not loaded (stale, not admitted, or over budget)
    demand_accesses: int = 0  # (forward, layer, expert) demands
    demand_hits_from_prefetch: int = 0  # first demand hits on prefetched entries (recall numerator)
    stall_seconds: float = 0.0  # time forwards waited for expert loads
    tokens: int = 0  # tokens that went through layer 0 (for per-token rates)
    forwards: int = 0
    distinct_experts: int = 0  # sum over (forward, layer) of distinct experts used
    resident_bytes: int = 0  # fast-tier bytes now
    peak_resident_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.tiers:
            self.tiers = {"gpu": TierStats(), "ram": TierStats(), "disk": TierStats()}
        shape = [[0] * self.num_experts for _ in range(self.num_layers)]
        for name in ("expert_load", "expert_hits", "expert_misses"):
            if not getattr(self, name):
                setattr(self, name, [row[:] for row in shape])

    @property
    def hit_rate(self) -> float:
        """Fast-tier hits / demand accesses."""
        hits = sum(map(sum, self.expert_hits))
        return hits / self.demand_accesses if self.demand_accesses else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Prefetched experts demanded before eviction / prefetched experts."""
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the demands the cache did not hold on its own, the share a prefetch had brought in.

        hits on prefetched entries / (hits on prefetched entries + misses).
        """
        misses = sum(map(sum, self.expert_misses))
        covered = self.demand_hits_from_prefetch
        return covered / (covered + misses) if covered + misses else 0.0

    @property
    def stall_per_token_s(self) -> float:
        """Seconds of expert-load stall per token."""
        return self.stall_seconds / self.tokens if self.tokens else 0.0

    @property
    def distinct_experts_per_batch(self) -> float:
        """Mean distinct experts one batch activates per MoE layer."""
        n = self.forwards * self.num_layers
        return self.distinct_experts / n if n else 0.0
