"""Which KV heads go from which prefill rank to which decode rank, between TP groups of any sizes.

A pure function of (num_kv_heads, sender TP size a, receiver TP size b), computed once per pair of
groups. Each rank owns the heads `TPShard.kv_heads` gives it; a head held by several ranks (fewer
KV heads than ranks) is sent by one of its owners only, and every receiving rank that holds it
gets its own copy. The k-th receiver of a head gets it from owner k mod (number of owners), so
equal layouts (a == b) route rank i to rank i only, and replicas share the sending.
"""

from __future__ import annotations

from dataclasses import dataclass

from batonserve.workers.tp.shard import TPShard


@dataclass(frozen=True)
class HeadRoute:
    """KV heads [start, stop) (model numbering) go from sender rank `src` to receiver rank `dst`."""

    src: int
    dst: int
    start: int
    stop: int


def _owners(num_kv: int, size: int) -> list[list[int]]:
    """For each KV head, the ranks of a group of `size` that hold it, in rank order."""
    owners: list[list[int]] = [[] for _ in range(num_kv)]
    for r in range(size):
        a, b = TPShard(r, size).kv_heads(num_kv)
        for h in range(a, b):
            owners[h].append(r)
    return owners


def head_routes(num_kv: int, a: int, b: int) -> tuple[HeadRoute, ...]:
    """Every (sender rank, receiver rank, head range) of a handoff from TP=a to TP=b, ordered by
    (dst, start); consecutive heads with the same sender are one range. ValueError when a or b
    cannot split `num_kv` heads (as `TPShard.kv_heads`)."""
    senders, receivers = _owners(num_kv, a), _owners(num_kv, b)
    routes: list[HeadRoute] = []
    for dst in range(b):
        first, last = TPShard(dst, b).kv_heads(num_kv)
        for h in range(first, last):
            src = senders[h][receivers[h].index(dst) % len(senders[h])]
            prev = routes[-1] if routes else None
            if prev is not None and (prev.src, prev.dst, prev.stop) == (src, dst, h):
                routes[-1] = HeadRoute(src, dst, prev.start, h + 1)
            else:
                routes.append(HeadRoute(src, dst, h, h + 1))
    return tuple(routes)
