"""A byte-budgeted tier of resident experts whose evictions and admissions a CachePolicy decides.

Not thread-safe by itself: the store calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from batonserve.workers.expert_store.policies.base import CachePolicy
from batonserve.workers.expert_store.types import ExpertKey, ExpertWeights, TierStats


@dataclass
class Entry:
    """One resident expert."""

    weights: ExpertWeights
    prefetched: bool  # brought in by a prefetch
    used: bool = False  # demanded since it arrived


class CacheTier:
    """Resident experts under a byte budget."""

    def __init__(
        self,
        budget_bytes: int,
        policy: CachePolicy,
        stats: TierStats,
        on_evict: Callable[[ExpertKey], None] | None = None,
    ) -> None:
        self.budget = budget_bytes
        self.on_evict = on_evict  # told after each eviction (the store frees the expert's slot)
        self.policy = policy
        self.stats = stats
        self.entries: dict[ExpertKey, Entry] = {}
        self.used_bytes = 0
        self.evicted_unused_prefetch = 0

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get(self, key: ExpertKey) -> Entry | None:
        """The resident entry of `key`, or None."""
        return self.entries.get(key)

    def plan_room(
        self, nbytes: int, now: int, protect: Collection[ExpertKey]
    ) -> list[ExpertKey] | None:
        """The victims (in order) that free `nbytes`, or None if protected entries block it."""
        if nbytes > self.budget:
            return None
        victims: list[ExpertKey] = []
        free = self.budget - self.used_bytes
        candidates = set(self.entries) - set(protect)
        while free < nbytes:
            if not candidates:
                return None
            victim = self.policy.victim(candidates, now)
            candidates.discard(victim)
            victims.append(victim)
            free += self.entries[victim].weights.nbytes
        return victims

    def would_admit(
        self, key: ExpertKey, nbytes: int, now: int, protect: Collection[ExpertKey], prefetch: bool
    ) -> bool:
        """Whether inserting `key` now would be accepted (the policy may refuse to evict)."""
        victims = self.plan_room(nbytes, now, protect)
        if victims is None:
            return False
        return all(self.policy.admit(key, v, now, prefetch) for v in victims)

    def insert(
        self,
        key: ExpertKey,
        weights: ExpertWeights,
        now: int,
        protect: Collection[ExpertKey],
        prefetch: bool,
    ) -> bool:
        """Make `key` resident, evicting as the policy says; False (nothing changes) if refused."""
        if key in self.entries:
            return True
        victims = self.plan_room(weights.nbytes, now, protect)
        if victims is None or not all(self.policy.admit(key, v, now, prefetch) for v in victims):
            return False
        for victim in victims:
            self.evict(victim)
        self.entries[key] = Entry(weights, prefetched=prefetch)
        self.used_bytes += weights.nbytes
        self.stats.bytes_in += weights.nbytes
        self.policy.on_insert(key, now)
        return True

    def evict(self, key: ExpertKey) -> None:
        """Drop `key` from the tier."""
        entry = self.entries.pop(key)
        self.used_bytes -= entry.weights.nbytes
        self.stats.evictions += 1
        if entry.prefetched and not entry.used:
            self.evicted_unused_prefetch += 1
        self.policy.on_evict(key)
        if self.on_evict is not None:
            self.on_evict(key)


class Slab:
    """The compute tier's memory on CPU, allocated once: `slots` experts' tensors in two stacked
    tensors ([slots, 2I, D] and [slots, D, I]). Reads copy into a free slot and eviction frees it,
    so the tier's memory is exactly the slots it was given and the allocator never sees an expert
    come or go (no heap growth from freed experts, no page faults on reuse).

    A slot is reused in place: an evicted expert's tensors must not be in use, which the store
    guarantees by never evicting the experts of the layer being computed (`protect`).
    """

    def __init__(
        self,
        slots: int,
        gate_up_shape: tuple[int, ...],
        down_shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        self.gate_up = torch.empty((slots, *gate_up_shape), dtype=dtype)
        self.down = torch.empty((slots, *down_shape), dtype=dtype)
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def slots(self) -> int:
        """How many experts the slab holds."""
        return int(self.gate_up.shape[0])

    def weights(self, slot: int) -> ExpertWeights:
        """The tensors of `slot` (views into the slab)."""
        return ExpertWeights(self.gate_up[slot], self.down[slot])
