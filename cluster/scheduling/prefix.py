"""Which KV prefixes each worker holds: the lookup behind conditional disaggregation.

The live cluster feeds an index from its workers' block pools (the hashes they report); the
simulator implements the same protocol over its simulated caches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol


class PrefixLookup(Protocol):
    """Answers: how many leading blocks of this prompt does a worker already cache?"""

    def cached_prefix_blocks(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """Length of the longest run of `block_hashes`, from the first, cached on the worker."""
        ...


class NoPrefixCache:
    """A lookup that knows of no cached prefix (conditional disaggregation by length only)."""

    def cached_prefix_blocks(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """Always zero."""
        return 0


class PrefixIndex:
    """Per-worker sets of cached block hashes, updated as workers report them."""

    def __init__(self) -> None:
        self._by_worker: dict[str, set[int]] = {}

    def replace(self, worker_id: str, hashes: Iterable[int]) -> None:
        """Set the worker's full list of cached hashes (a periodic report)."""
        self._by_worker[worker_id] = set(hashes)

    def add(self, worker_id: str, hashes: Iterable[int]) -> None:
        """Record newly cached blocks."""
        self._by_worker.setdefault(worker_id, set()).update(hashes)

    def discard(self, worker_id: str, hashes: Iterable[int]) -> None:
        """Forget evicted blocks."""
        held = self._by_worker.get(worker_id)
        if held is not None:
            held.difference_update(hashes)

    def drop_worker(self, worker_id: str) -> None:
        """Forget a dead or removed worker."""
        self._by_worker.pop(worker_id, None)

    def cached_prefix_blocks(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """Leading blocks of `block_hashes` the worker holds (hashes are chained, so stop at a miss)."""
        held = self._by_worker.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in block_hashes:
            if h not in held:
                break
            n += 1
        return n
