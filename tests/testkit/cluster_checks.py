"""Checks shared by the live-cluster tests: deterministic prompts, one stream to its end, and
waiting for an idle cluster."""

from __future__ import annotations

import time
from typing import Any

from batonserve.cluster.api import GenerateRequest
from batonserve.workers.sampling_params import SamplingParams


def prompt_of(i: int, n: int) -> list[int]:
    """A deterministic prompt of `n` token ids."""
    return [3 + (i * 37 + j * 11) % 300 for j in range(n)]


async def collect(cluster: Any, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    """Stream one request to its end: its tokens (it must end at max_tokens, usage counting them)."""
    toks: list[int] = []
    last = None
    async for d in cluster.generate(GenerateRequest(rid, tuple(prompt), params)):
        toks += d.token_ids
        last = d
    assert last is not None and last.finish_reason == "length" and last.usage is not None
    assert last.usage.completion_tokens == len(toks)
    return toks


def idle(cluster: Any) -> bool:
    """Every worker healthy with all KV blocks free, nothing running, pinned or in a handoff."""
    return not cluster.ledger.live() and all(
        w.healthy
        and w.stats is not None
        and w.stats.num_free_blocks == w.stats.num_blocks
        and not (w.stats.pinned or w.stats.imports or w.stats.exports)
        and not (w.stats.running or w.stats.waiting)
        for w in cluster.controller.workers.values()
    )


def wait_idle(cluster: Any, timeout: float = 30) -> None:
    """Wait until `idle(cluster)`; fails with every worker's stats after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if idle(cluster):
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {[w.stats for w in cluster.controller.workers.values()]}")
