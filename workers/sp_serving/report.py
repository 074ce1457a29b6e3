"""What a ring member reports per ring prefill, carried in its WorkerStats."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SPStepReport:
    """One member's figures for one ring prefill (summed over layers)."""

    seq: int  # increasing per worker: the cluster reports each once
    request_id: str
    schedule: str
    world_size: int
    rank: int
    prompt_tokens: int
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    total_s: float  # wall time of the whole forward
    bytes_sent: int

    @property
    def hidden_fraction(self) -> float:
        """Share of communication time hidden behind compute (1.0 with none)."""
        if self.comm_s <= 0.0:
            return 1.0
        return max(0.0, min(1.0, 1.0 - self.exposed_comm_s / self.comm_s))
