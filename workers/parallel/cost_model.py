"""Pick a sequence-parallel schedule per request from head counts, new vs cached tokens and N.

Per step a rank attends one block (balanced by the layout: about 1/N^2 of the causal pairs) while
the next block's transfer runs; a step costs max(compute, busiest link / bandwidth) + latency.
Pass-KV forwards K and V of every KV row (cached prefix included): 2 * Hkv * d per row. Pass-Q
forwards H * d per query row one way and H * (d + lse) back the other way; links are full duplex,
so its step costs the busier direction. So with GQA (Hkv < H/2) pass-Q moves more bytes per link
than pass-KV, with MHA about half; a long cached prefix (many KV rows, few queries) favours pass-Q.
The all-gather baseline moves (N - 1) padded KV blocks up front with nothing to hide behind.
"""

from __future__ import annotations

from dataclasses import dataclass

from batonserve.workers.parallel.layout import LAYOUTS, shard_batch
from batonserve.workers.parallel.schedules import SCHEDULES, AttentionDims, LinkBytes, get_schedule


@dataclass(frozen=True)
class HardwareModel:
    """Throughputs of one rank and one link direction (defaults: a GPU with a fast P2P link)."""

    flops_per_s: float = 4.0e14
    link_bytes_per_s: float = 1.0e11
    step_latency_s: float = 2.0e-5  # per posted transfer round

    def __post_init__(self) -> None:
        if min(self.flops_per_s, self.link_bytes_per_s) <= 0 or self.step_latency_s < 0:
            raise ValueError(f"HardwareModel throughputs must be > 0, got {self}")


@dataclass(frozen=True)
class SPShape:
    """What the cost model knows of a request (treated as one sequence)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    new_tokens: int
    cached_tokens: int
    world_size: int
    elem_bytes: int = 2
    layout: str = "zigzag"
    prefix_placement: str = "spread"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size} must be >= 1")
        if self.new_tokens < 0 or self.cached_tokens < 0:
            raise ValueError(f"new_tokens and cached_tokens must be >= 0, got {self}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not one of {LAYOUTS}")

    @property
    def dims(self) -> AttentionDims:
        """Head geometry."""
        return AttentionDims(self.num_heads, self.num_kv_heads, self.head_dim, self.elem_bytes)

    def rows(self) -> tuple[list[int], list[int]]:
        """(query rows, KV rows) per rank under the layout."""
        n_q, n_kv = [], []
        for r in range(self.world_size):
            sh = shard_batch(
                [self.new_tokens],
                [self.cached_tokens],
                self.world_size,
                r,
                layout=self.layout,
                prefix_placement=self.prefix_placement,
            )
            n_q.append(sh.spec.num_q)
            n_kv.append(sh.spec.num_kv)
        return n_q, n_kv


@dataclass(frozen=True)
class ScheduleEstimate:
    """The cost model's view of one schedule on one shape."""

    schedule: str
    time_s: float
    compute_s: float
    comm_s: float  # busiest-link transfer time summed over steps
    busiest_step_bytes: int  # bytes on the busiest link in the heaviest step of any rank


def bytes_sent_per_step(
    schedule: str, n_q: list[int], n_kv: list[int], rank: int, dims: AttentionDims
) -> list[LinkBytes]:
    """Bytes `rank` sends in each step of `schedule` (the formula the tests check against)."""
    return get_schedule(schedule).bytes_per_step(n_q, n_kv, rank, dims)


def estimate(schedule: str, shape: SPShape, hw: HardwareModel | None = None) -> ScheduleEstimate:
    """Estimated wall time of `schedule` on `shape` (the slowest rank)."""
    hw = hw or HardwareModel()
    n = shape.world_size
    new, cached = shape.new_tokens, shape.cached_tokens
    pairs = new * (new + 1) / 2 + new * cached  # causal (query, key) pairs of the request
    compute_total = 4.0 * shape.num_heads * shape.head_dim * pairs / hw.flops_per_s
    per_step = compute_total / (n * n)  # a balanced layout gives each rank ~1/N^2 per step
    n_q, n_kv = shape.rows()
    sched = get_schedule(schedule)
    worst = 0.0
    comm_worst = 0.0
    heaviest = 0
    for r in range(n):
        steps = sched.bytes_per_step(n_q, n_kv, r, shape.dims)
        heaviest = max([heaviest, *(b.busiest for b in steps)])
        comm = [
            b.busiest / hw.link_bytes_per_s + (hw.step_latency_s if b.total else 0.0) for b in steps
        ]
        if schedule == "allgather":
            t = comm[0] + n * per_step  # gather first, then all of this rank's attention
        elif schedule == "tokenring":
            # Step s's result leaves after its compute: the last result is not hidden.
            # Step s carries queries forward while step s-1's result goes back (the other direction).
            back_prev = [0, *(b.back for b in steps[:-1])]
            bw = hw.link_bytes_per_s
            t = sum(max(per_step, steps[s].fwd / bw, back_prev[s] / bw) for s in range(n))
            t += steps[-1].back / bw if n > 1 else 0.0
            t += sum(hw.step_latency_s for b in steps if b.total)
        else:
            t = sum(max(per_step, c) for c in comm)
        worst = max(worst, t)
        comm_worst = max(comm_worst, sum(comm))
    return ScheduleEstimate(schedule, worst, compute_total / n, comm_worst, heaviest)


def rank_schedules(shape: SPShape, hw: HardwareModel | None = None) -> list[ScheduleEstimate]:
    """Every registered schedule's estimate, fastest first (ties: fewer bytes on the busiest link)."""
    ests = [estimate(name, shape, hw) for name in sorted(SCHEDULES)]
    return sorted(ests, key=lambda e: (round(e.time_s, 12), e.busiest_step_bytes, e.schedule))


def choose_schedule(shape: SPShape, hw: HardwareModel | None = None) -> str:
    """The schedule the cost model expects to be fastest on `shape`."""
    if shape.world_size == 1:
        return "ring"  # no communication at all: every schedule is the same local attention
    return rank_schedules(shape, hw)[0].schedule
