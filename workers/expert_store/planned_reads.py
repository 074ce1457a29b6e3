"""Lockstep prefetch: which experts to prefetch is decided at fixed points, only the reads run behind.

The background `Prefetcher` decides admission and insertion whenever its thread gets to a forecast,
so what is resident at a demand depends on timing. Under tensor parallelism every rank must keep,
hit and miss the same experts, so there the store plans prefetches itself at a fixed point of the
forward (right after a layer's demand loads): admission, evictions and the insertion happen then,
in the forward's thread, from state every rank shares. Only the checkpoint read of each planned
expert runs on one background thread, and a layer waits for the reads planned for it before its
experts are used. Residency and hit/miss counts then depend on the demand sequence alone.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from batonserve.workers.expert_store.types import ExpertKey, ExpertWeights


class PlannedReads:
    """Reads of planned prefetches, run in submission order on one thread, keyed by expert."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")
        self._pending: dict[ExpertKey, tuple[int, Future[ExpertWeights]]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._pending

    def keys(self) -> frozenset[ExpertKey]:
        """Experts whose read is planned and not yet collected."""
        return frozenset(self._pending)

    def submit(self, key: ExpertKey, tick: int, read: Callable[[], ExpertWeights]) -> None:
        """Start reading `key`, which layer tick `tick` is forecast to use."""
        self._pending[key] = (tick, self._pool.submit(read))

    def due(self, tick: int) -> list[tuple[ExpertKey, Future[ExpertWeights]]]:
        """Remove and return the reads planned for ticks up to `tick`, in key order."""
        keys = sorted(k for k, (t, _) in self._pending.items() if t <= tick)
        return [(k, self._pending.pop(k)[1]) for k in keys]

    def drain(self) -> None:
        """Wait until every submitted read has finished (they stay pending)."""
        wait([f for _, f in self._pending.values()])

    def close(self) -> None:
        """Finish the reads in flight (they write into tier memory), then stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
