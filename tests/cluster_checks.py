"""Checks shared by the live-cluster tests: deterministic prompts, and waiting for an idle cluster."""

from __future__ import annotations

import time
from typing import Any


def prompt_of(i: int, n: int) -> list[int]:
    """A deterministic prompt of `n` token ids."""
    return [3 + (i * 37 + j * 11) % 300 for j in range(n)]


def wait_idle(cluster: Any, timeout: float = 30) -> None:
    """Every worker healthy with all KV blocks free, nothing running, pinned or in a handoff."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws = list(cluster.controller.workers.values())
        if (
            all(
                w.healthy
                and w.stats is not None
                and w.stats.num_free_blocks == w.stats.num_blocks
                and not (w.stats.pinned or w.stats.imports or w.stats.exports)
                and not (w.stats.running or w.stats.waiting)
                for w in ws
            )
            and not cluster.ledger.live()
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {[w.stats for w in cluster.controller.workers.values()]}")
