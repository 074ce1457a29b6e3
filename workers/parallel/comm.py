"""Point-to-point plumbing of a sequence-parallel group: two process groups, timed waits, clear errors.

gloo hygiene kept here: every buffer handed to a send/recv is contiguous, a rank never sends to
itself, zero-size transfers are skipped on both sides (both know the sizes from the plan), waits block
with a timeout instead of polling, and a peer that died or went silent raises `SPCommError` naming
the schedule and step within the timeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from batonserve.workers.parallel.metrics import StepRecorder


class SPCommError(RuntimeError):
    """A peer of the sequence-parallel group failed or did not answer within the timeout."""


class SPGroup:
    """The process groups of one sequence-parallel group.

    `group` carries queries/KV one way round the ring and the collectives; `back` is a second group
    (its own gloo pairs) for pass-Q results travelling back to their owners, so both link directions
    carry data at once. Collective: every member constructs it together, in the same order.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        pg = group if group is not None else dist.group.WORLD
        assert pg is not None, "torch.distributed is not initialised"
        self.group: dist.ProcessGroup = pg
        self.rank: int = dist.get_rank(pg)
        self.world_size: int = dist.get_world_size(pg)
        self.ranks: list[int] = list(dist.get_process_group_ranks(pg))
        self.timeout = timedelta(seconds=timeout_s)
        # NCCL moves only CUDA tensors; metadata and buffers the schedules allocate live here.
        nccl = dist.get_backend(pg) == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )
        # Local synchronisation: only the members build it, so a ring inside a larger world works.
        back = (
            dist.new_group(self.ranks, timeout=self.timeout, use_local_synchronization=True)
            if self.world_size > 1
            else pg
        )
        assert back is not None
        self.back: dist.ProcessGroup = back

    @property
    def next_rank(self) -> int:
        """The group rank queries/KV are sent to."""
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        """The group rank queries/KV arrive from."""
        return (self.rank - 1) % self.world_size

    def global_rank(self, group_rank: int) -> int:
        """The world rank of a group rank (torch's isend/irecv take world ranks)."""
        return self.ranks[group_rank]


@dataclass(frozen=True)
class P2P:
    """One send or receive of a step."""

    kind: Literal["send", "recv"]
    tensor: torch.Tensor
    peer: int  # group rank
    back: bool = False  # on the second (result) group


class Pending:
    """Transfers posted together, waited together; timings go to a step recorder.

    gloo works have no completion callbacks, and polling is out, so a helper thread blocks in the
    works' own wait and stamps the completion time: comm_s is the real transfer time even when it
    ends in the middle of the compute, and exposed_comm_s is the part the caller sat waiting for.
    """

    def __init__(
        self, works: list[dist.Work], what: str, rec: StepRecorder | None, g: SPGroup
    ) -> None:
        self.what = what
        self.rec = rec
        self.posted = time.perf_counter()
        self._done_at = self.posted
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self._waited = False
        self._thread: threading.Thread | None = None
        # NCCL's wait orders the *calling thread's* CUDA stream after the transfer, so on CUDA
        # the caller waits itself (comm_s is then post-to-wait, an upper bound).
        self._direct = works if g.device.type != "cpu" else []
        if works and not self._direct:
            self._thread = threading.Thread(
                target=self._watch, args=(works, g.timeout), daemon=True
            )
            self._thread.start()
        else:
            self._finished.set()

    def _wait_direct(self, timeout: timedelta) -> None:
        """Caller-thread wait (CUDA): the same error handling as the helper's."""
        try:
            for w in self._direct:
                w.wait(timeout)
        except BaseException as e:
            self._error = e
        self._done_at = time.perf_counter()
        self._direct = []

    def _watch(self, works: list[dist.Work], timeout: timedelta) -> None:
        """Helper thread: block in each work's wait (bounded by the group timeout)."""
        try:
            for w in works:
                w.wait(timeout)
        except BaseException as e:  # handed to the caller's wait()
            self._error = e
        self._done_at = time.perf_counter()
        works.clear()  # drop the Work handles here, not in a thread that outlives its wait
        self._finished.set()

    def wait(self, g: SPGroup) -> None:
        """Block until every transfer completes, or raise SPCommError after the group timeout."""
        if self._waited:
            return
        t0 = time.perf_counter()
        if self._direct:
            self._wait_direct(g.timeout)
        # The helper's own wait is bounded by the timeout; the slack covers thread scheduling.
        finished = self._finished.wait(g.timeout.total_seconds() + 5.0)
        if not finished or self._error is not None:
            raise SPCommError(
                f"sequence-parallel {self.what} on rank {g.rank}/{g.world_size} failed "
                f"(a peer died or did not answer within {g.timeout.total_seconds():.0f}s): "
                f"{self._error if self._error is not None else 'no completion'}"
            ) from self._error
        self._waited = True
        if self._thread is not None:
            # Already past its wait: joining keeps no helper alive into teardown or interpreter exit.
            self._thread.join(g.timeout.total_seconds())
        if self.rec is not None:
            self.rec.exposed_comm_s += max(0.0, self._done_at - t0)
            self.rec.comm_s += self._done_at - self.posted


def post(g: SPGroup, ops: list[P2P], what: str, rec: StepRecorder | None) -> Pending:
    """Post sends/receives (non-blocking, same order on every rank) and count their bytes."""
    works: list[dist.Work] = []
    try:
        for op in ops:
            assert op.peer != g.rank, "no self-sends"
            if op.tensor.numel() == 0:
                continue  # the peer skips it too: sizes come from the shared plan
            assert op.tensor.is_contiguous()
            pg = g.back if op.back else g.group
            fn = dist.isend if op.kind == "send" else dist.irecv
            work = fn(op.tensor, g.global_rank(op.peer), group=pg)
            assert work is not None
            works.append(work)
            if rec is not None:
                nbytes = op.tensor.numel() * op.tensor.element_size()
                if op.kind == "send":
                    rec.bytes_sent += nbytes
                else:
                    rec.bytes_recv += nbytes
    except RuntimeError as e:
        raise SPCommError(f"sequence-parallel {what} on rank {g.rank}: posting failed: {e}") from e
    return Pending(works, what, rec, g)


def all_gather_padded(
    g: SPGroup, x: torch.Tensor, sizes: list[int], what: str, rec: StepRecorder | None
) -> list[torch.Tensor]:
    """All-gather dim-0 blocks of unequal sizes (padded to the largest); returns each rank's block."""
    assert x.shape[0] == sizes[g.rank]
    top = max(sizes)
    if g.world_size == 1:
        return [x]
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    outs = [torch.empty_like(padded) for _ in range(g.world_size)]
    try:
        work = dist.all_gather(outs, padded, group=g.group, async_op=True)
    except RuntimeError as e:
        raise SPCommError(f"sequence-parallel {what} on rank {g.rank}: posting failed: {e}") from e
    assert work is not None
    if rec is not None:
        # A ring all-gather forwards N-1 blocks per rank.
        rec.bytes_sent += (g.world_size - 1) * padded.numel() * padded.element_size()
        rec.bytes_recv += (g.world_size - 1) * padded.numel() * padded.element_size()
    Pending([work], what, rec, g).wait(g)
    return [o[:n] for o, n in zip(outs, sizes, strict=True)]
