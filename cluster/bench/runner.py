"""Drives a workload against the server: open loop (arrival times) or closed loop (concurrency)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

from batonserve.cluster.bench.drivers import (
    Connection,
    Driver,
    KServeDriver,
    NativeDriver,
    RequestResult,
    open_channel,
)
from batonserve.cluster.bench.openai_driver import OpenAIDriver
from batonserve.cluster.bench.workload import BenchRequest

Protocol = Literal["native", "kserve", "openai"]
PROTOCOLS = ("native", "kserve", "openai")


@dataclass(frozen=True)
class BenchConfig:
    """One bench run: where, which protocol, and its bounds."""

    connection: Connection
    protocol: Protocol = "native"
    concurrency: int = 0  # > 0: closed loop (arrival times are ignored)
    duration_s: float = 60.0  # no request starts after this; in-flight ones finish (deadline)
    seed: int = 0
    progress_interval_s: float = 2.0  # 0: no progress lines
    model: str = ""  # KServe model name (default: the server's)
    context_length: int = 0  # KServe only, when the server cannot say

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol: one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.concurrency < 0:
            raise ValueError(f"--concurrency: must be >= 0, got {self.concurrency}")
        if self.duration_s <= 0:
            raise ValueError(f"--duration: must be > 0 s, got {self.duration_s}")


@dataclass
class _Progress:
    sent: int = 0
    done: int = 0
    errors: int = 0


def _driver(cfg: BenchConfig) -> tuple[Driver, Callable[[], Awaitable[None]]]:
    if cfg.protocol == "openai":  # HTTP: cfg.connection.target is the OpenAI API's address
        http = OpenAIDriver(cfg.connection, cfg.seed, cfg.model)
        return http, http.close
    channel, metadata = open_channel(cfg.connection)
    timeout = cfg.connection.timeout_s
    driver: Driver
    if cfg.protocol == "native":
        driver = NativeDriver(channel, metadata, timeout, cfg.seed)
    else:
        driver = KServeDriver(channel, metadata, timeout, cfg.seed, cfg.model, cfg.context_length)
    return driver, channel.close


async def _report_progress(p: _Progress, t0: float, every: float, out: TextIO) -> None:
    while True:
        await asyncio.sleep(every)
        print(
            f"bench: {time.perf_counter() - t0:7.1f}s  sent {p.sent}  done {p.done}  "
            f"in flight {p.sent - p.done}  errors {p.errors}",
            file=out,
            flush=True,
        )


async def run_bench(
    cfg: BenchConfig, requests: Sequence[BenchRequest], err: TextIO = sys.stderr
) -> tuple[list[RequestResult], float]:
    """Send `requests` (bounded by their count and cfg.duration_s); results and wall seconds."""
    driver, close = _driver(cfg)
    progress = _Progress()
    results: list[RequestResult] = []
    try:
        await driver.prepare()
        t0 = time.perf_counter()
        ticker = (
            asyncio.create_task(_report_progress(progress, t0, cfg.progress_interval_s, err))
            if cfg.progress_interval_s > 0
            else None
        )

        async def one(req: BenchRequest) -> None:
            progress.sent += 1
            res = await driver.send(req, t0)
            progress.done += 1
            progress.errors += not res.ok
            results.append(res)

        def time_left() -> bool:
            return time.perf_counter() - t0 < cfg.duration_s

        try:
            if cfg.concurrency:
                queue = iter(requests)

                async def worker() -> None:
                    for req in queue:  # shared iterator: each request is sent once
                        if not time_left():
                            return
                        await one(req)

                await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
            else:
                tasks = []
                for req in requests:
                    delay = (req.arrival_s or 0.0) - (time.perf_counter() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if not time_left():
                        break
                    tasks.append(asyncio.create_task(one(req)))
                await asyncio.gather(*tasks)
        finally:
            if ticker is not None:
                ticker.cancel()
        wall = time.perf_counter() - t0
    finally:
        await close()
    results.sort(key=lambda r: r.index)
    return results, wall
