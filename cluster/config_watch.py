"""Re-reading the config while serving: the pools' replicas apply live, anything else waits.

In Kubernetes the config is a ConfigMap mounted as a directory; a replicas-only `helm upgrade`
rewrites the file in place and restarts no pod (the chart's checksum leaves the scale out). The
watcher loads the config again every period and hands each pool's new replicas to
`set_replicas`; any other difference is logged, once per distinct content, as needing a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from batonserve.cluster.config import ServeConfig

log = logging.getLogger("batonserve.config_watch")

C = TypeVar("C")

WATCH_S = 5.0
SCALE_KEYS = ("replicas", "min_replicas", "max_replicas")  # what KubeRay scales without restarts


def without_scale(cfg: ServeConfig) -> ServeConfig:
    """The config with every pool's scale zeroed: what must stay equal for a live change."""
    zero = dict.fromkeys(SCALE_KEYS, 0)
    return dataclasses.replace(cfg, pools=tuple(dataclasses.replace(p, **zero) for p in cfg.pools))


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (pools by index)."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        out: list[str] = []
        for f in dataclasses.fields(a):
            out += differences(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
        return [k.lstrip(".") for k in out]
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return [
            k
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for k in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [path.lstrip(".")]


def live_change(running: ServeConfig, new: ServeConfig) -> tuple[dict[str, int], list[str]]:
    """(pool -> new replicas, keys that differ otherwise and need a restart)."""
    other = differences(without_scale(running), without_scale(new))
    if other:
        return {}, other
    replicas = {
        p.name: q.replicas
        for p, q in zip(running.pools, new.pools, strict=True)
        if p.replicas != q.replicas
    }
    return replicas, []


class ConfigWatcher:
    """Loads the config every `period` seconds and applies replica changes through `apply`."""

    def __init__(
        self,
        load: Callable[[], ServeConfig],
        running: ServeConfig,
        apply: Callable[[str, int], None],
        period: float = WATCH_S,
    ) -> None:
        self.load = load
        self.running = running  # the config the cluster serves, with the replicas applied so far
        self.apply = apply
        self.period = period
        self._reported: ServeConfig | None = None

    async def run(self) -> None:
        """Check forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.period)
            await self.check()

    async def check(self) -> None:
        """One re-read: apply the new replicas, or say why the new config needs a restart."""
        try:
            new = await asyncio.to_thread(self.load)
        except Exception as e:  # a half-written or invalid file: keep serving the last good one
            log.warning("config re-read failed, keeping the running config: %s", e)
            return
        replicas, other = live_change(self.running, new)
        if other:
            if new != self._reported:
                self._reported = new
                log.warning(
                    "the config file changed %s: only pools[].replicas apply while serving; "
                    "restart to apply the rest (nothing applied)",
                    ", ".join(other),
                )
            return
        pools = list(self.running.pools)
        for i, p in enumerate(pools):
            n = replicas.get(p.name)
            if n is None:
                continue
            try:
                self.apply(p.name, n)
            except ValueError as e:
                if new != self._reported:
                    log.warning("config re-read: %s (not applied)", e)
                continue
            log.info("config re-read: pool %s replicas %d -> %d", p.name, p.replicas, n)
            pools[i] = dataclasses.replace(p, replicas=n)
        self.running = dataclasses.replace(self.running, pools=tuple(pools))
        self._reported = new


def watching(
    start: Callable[[ServeConfig, Callable[[str], None]], Awaitable[C]],
    load: Callable[[], ServeConfig],
    period: float = WATCH_S,
) -> Callable[[ServeConfig, Callable[[str], None]], Awaitable[C]]:
    """`start` (a cluster factory), plus a ConfigWatcher on the cluster it returns.

    The cluster must have `set_replicas(pool, n)`; the watcher runs on the caller's event loop
    until that loop ends (asyncio.run cancels it).
    """
    tasks: list[asyncio.Task[None]] = []  # a reference, so the task is not collected

    async def started(config: ServeConfig, progress: Callable[[str], None]) -> C:
        cluster = await start(config, progress)
        watcher = ConfigWatcher(load, config, cluster.set_replicas, period)  # type: ignore[attr-defined]
        tasks.append(asyncio.get_running_loop().create_task(watcher.run()))
        return cluster

    return started
