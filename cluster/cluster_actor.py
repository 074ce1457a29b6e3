"""The cluster as a detached, named Ray actor: it outlives every router that talks to it.

`ClusterActor` hosts the ordinary `Cluster` (pools, workers, request table, pairing, handoffs) on
its own asyncio loop. Worker actors created from inside it are owned by it, so a router's death
takes no worker with it. Routers are clients (`remote_cluster.RemoteCluster`): each opens a
session, submits requests and reads their deltas with batched long-polls. A session that stops
polling for `READ_LEASE_S` (its router died) has its requests aborted, so every block comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batonserve.cluster.api import (
    AdmissionRejected,
    ClusterUnavailable,
    GenerateRequest,
    ModelInfo,
    ServerInfo,
    TokenDelta,
)
from batonserve.cluster.config import ServeConfig
from batonserve.cluster.config_watch import SCALE_KEYS
from batonserve.cluster.placement import StartupError

if TYPE_CHECKING:
    from batonserve.workers.scripted_engine import ScriptedEngineConfig

log = logging.getLogger("batonserve.cluster_actor")

ACTOR_NAME = "batonserve-cluster"
READ_LEASE_S = 5.0  # a router that has not polled for this long is gone: abort its requests
LEASE_CHECK_S = 0.5


@dataclass(frozen=True)
class StreamError:
    """A request's stream ended with an error: `kind` names the exception the router raises."""

    kind: str  # "rejected", "unavailable", "invalid" or "internal"
    message: str
    reason: str = ""  # AdmissionRejected's metrics label


@dataclass(frozen=True)
class PollBatch:
    """What one long-poll brings a router: new items per request, and the actor's clock."""

    items: dict[str, list[TokenDelta | StreamError]]
    now: float  # the actor's time.monotonic(), to move `scheduled_at` onto the router's clock
    closing: bool = False


@dataclass
class _Session:
    """One router: its requests' pump tasks and the items they produced not yet read."""

    last_read: float = field(default_factory=time.monotonic)
    pumps: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    outbox: dict[str, list[TokenDelta | StreamError]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    polling: int = 0  # polls waiting now: a router inside a poll is reading


def config_diff(running: ServeConfig, wanted: ServeConfig, replicas: bool = False) -> list[str]:
    """Dotted keys whose values differ, ignoring what each router sets for itself.

    The router section (ports, TLS, auth) and the Ray address belong to one router process.
    A pool's scale (SCALE_KEYS) is the cluster's own desired state (scaling changes it while it
    runs), so it is compared only with `replicas=True` (to tell the operator, not to refuse).
    """
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if path in ("router", "ray.address"):
            return
        if path.startswith("pools[") and path.rpartition(".")[2] in SCALE_KEYS and not replicas:
            return
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
            for f in dataclasses.fields(a):
                walk(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}".lstrip("."))
        elif isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            out.append(f"{path}: running {a!r}, this router {b!r}")

    walk(running, wanted, "")
    return out


def _error_of(e: BaseException) -> StreamError:
    if isinstance(e, AdmissionRejected):
        return StreamError("rejected", str(e), e.reason)
    if isinstance(e, ClusterUnavailable):
        return StreamError("unavailable", str(e))
    if isinstance(e, ValueError):
        return StreamError("invalid", str(e))
    return StreamError("internal", f"{type(e).__name__}: {e}")


class ClusterActor:
    """The Ray actor hosting one `Cluster` (create it with `lifetime="detached"`)."""

    def __init__(self, read_lease_s: float = READ_LEASE_S) -> None:
        self.read_lease_s = read_lease_s
        self.config: ServeConfig | None = None
        self.cluster: Any = None
        self.metrics: Any = None
        self._starting: asyncio.Task[None] | None = None
        self._progress: list[str] = []
        self._sessions: dict[str, _Session] = {}
        self._lease_task: asyncio.Task[None] | None = None
        self._closing = False

    # ---- start-up and attach -----------------------------------------------------------------

    async def start(
        self, config: ServeConfig, scripted: ScriptedEngineConfig | None = None
    ) -> tuple[str, str]:
        """Start the cluster (first caller) or wait for it; ("ok", note) or (kind, message).

        note: replica counts this config asks for that differ from the running cluster's.

        kind "mismatch": it runs another config (message lists what differs); "failed": start-up
        raised (message says why; the caller kills this actor so a later start can retry).
        """
        note = ""
        if self._starting is None:
            self.config = config
            self._starting = asyncio.ensure_future(self._start(config, scripted))
        else:
            assert self.config is not None
            diff = config_diff(self.config, config)
            if diff:
                return "mismatch", "; ".join(diff)
            note = "; ".join(config_diff(self.config, config, replicas=True))
        try:
            await asyncio.shield(self._starting)
        except StartupError as e:
            return "failed", str(e)
        except Exception as e:
            return "failed", f"{type(e).__name__}: {e}"
        return "ok", note

    async def _start(self, config: ServeConfig, scripted: ScriptedEngineConfig | None) -> None:
        from batonserve.cluster.metrics import Metrics
        from batonserve.cluster.runtime import start_cluster

        self.cluster = await start_cluster(config, self._progress.append, scripted=scripted)
        info = self.cluster.model_info()
        self.metrics = Metrics(info.name, max_model_len=info.context_length)
        self.cluster.attach_metrics(self.metrics)
        self.watch_leases()

    def watch_leases(self) -> None:
        """Start aborting the requests of routers that stop reading (once the cluster is up)."""
        if self._lease_task is None:
            self._lease_task = asyncio.ensure_future(self._expire_sessions())

    def progress(self, since: int) -> list[str]:
        """Start-up progress lines from index `since` on."""
        return self._progress[since:]

    def identity(self) -> dict[str, Any]:
        """Who runs here: the config (None before start) and each worker's actor id/incarnation."""
        workers = {}
        if self.cluster is not None:
            for h in self.cluster.controller.workers.values():
                aid = h.actor._actor_id.hex() if h.actor is not None else ""
                workers[h.name] = (aid, h.incarnation)
        return {"config": self.config, "workers": workers, "up": self.cluster is not None}

    # ---- the ClusterAPI, for routers ---------------------------------------------------------

    def model_info(self) -> ModelInfo:
        """The served model."""
        return self.cluster.model_info()

    async def status(self) -> tuple[bool, ServerInfo]:
        """(ready, server info) in one call: routers cache both."""
        if self.cluster is None:
            return False, ServerInfo(())
        return (not self._closing and self.cluster.ready()), self.cluster.server_info()

    async def submit(self, router: str, request: GenerateRequest) -> StreamError | None:
        """Pair and start a request of `router`; None, or the error its stream ends with at once."""
        if self.cluster is None or self._closing:
            return StreamError("unavailable", "the batonserve cluster is not serving")
        s = self._sessions.setdefault(router, _Session())
        s.last_read = time.monotonic()
        rid = request.request_id
        try:
            stream = self.cluster.generate(request)
        except Exception as e:
            return _error_of(e)
        s.outbox.setdefault(rid, [])
        s.pumps[rid] = asyncio.ensure_future(self._pump(s, rid, stream))
        return None

    async def _pump(self, s: _Session, rid: str, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async for d in stream:
                s.outbox.setdefault(rid, []).append(d)
                s.ready.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            s.outbox.setdefault(rid, []).append(_error_of(e))
            s.ready.set()
        finally:
            s.pumps.pop(rid, None)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # a stream closed early aborts its request in the cluster

    async def poll(self, router: str, timeout_s: float) -> PollBatch:
        """Every item of `router`'s requests not read yet; waits up to `timeout_s` for one.

        Each poll renews the router's read lease.
        """
        s = self._sessions.setdefault(router, _Session())
        s.last_read = time.monotonic()
        if not any(s.outbox.values()):
            s.ready.clear()
            s.polling += 1
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(s.ready.wait(), timeout_s)
            finally:
                s.polling -= 1
        s.last_read = time.monotonic()
        items = {rid: got for rid, got in s.outbox.items() if got}
        for rid, got in items.items():
            s.outbox[rid] = []
            if isinstance(got[-1], StreamError) or got[-1].finish_reason is not None:
                del s.outbox[rid]  # ended: nothing more will come
        return PollBatch(items, time.monotonic(), self._closing)

    async def abort(self, router: str, request_id: str) -> None:
        """Stop one request of `router` and free its KV everywhere; idempotent."""
        s = self._sessions.get(router)
        if s is not None:
            s.outbox.pop(request_id, None)
            task = s.pumps.pop(request_id, None)
            if task is not None:
                task.cancel()
        if self.cluster is not None:
            await self.cluster.abort(request_id)

    async def leave(self, router: str) -> None:
        """A router is going away: abort whatever it still has."""
        s = self._sessions.pop(router, None)
        if s is not None:
            await self._drop(s)

    async def _drop(self, s: _Session, why: StreamError | None = None) -> None:
        """Abort every request of a session; `why` is what a reader that comes back is told."""
        for rid in list(s.pumps):
            task = s.pumps.pop(rid)
            task.cancel()
            await self.cluster.abort(rid)
            s.outbox[rid] = [why] if why is not None else []
        s.outbox = {rid: got for rid, got in s.outbox.items() if got}

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(LEASE_CHECK_S, self.read_lease_s / 2))
            now = time.monotonic()
            for router, s in list(self._sessions.items()):
                idle = now - s.last_read
                if idle > self.read_lease_s and s.pumps and not s.polling:
                    n = len(s.pumps)
                    log.warning("router %s stopped reading: aborting its %d request(s)", router, n)
                    # A router that was only stalled finds its streams ended, never hanging.
                    why = StreamError(
                        "unavailable",
                        f"the router stopped reading for over {self.read_lease_s:g}s; "
                        "request aborted",
                    )
                    await self._drop(s, why)
                elif idle > 20 * self.read_lease_s and not s.pumps:
                    self._sessions.pop(router, None)  # gone for good: forget it

    def snapshot(self) -> dict[str, Any]:
        """Requests in flight, open handoffs and each worker's latest stats (checks, status)."""
        if self.cluster is None:
            return {"requests": 0, "handoffs": 0, "workers": {}}
        return {
            "requests": len(self.cluster.requests),
            "handoffs": len(self.cluster.ledger.live()),
            "workers": {
                h.name: (h.healthy, h.stats) for h in self.cluster.controller.workers.values()
            },
        }

    def set_replicas(self, pool: str, n: int) -> str:
        """Desired size of `pool` from now on; '' or why it was refused."""
        try:
            self.cluster.set_replicas(pool, n)
        except ValueError as e:
            return str(e)
        if self.config is not None:  # what attaching routers are told the cluster runs
            pools = [
                dataclasses.replace(p, replicas=n) if p.name == pool else p
                for p in self.config.pools
            ]
            self.config = dataclasses.replace(self.config, pools=tuple(pools))
        return ""

    def sessions(self) -> dict[str, int]:
        """Routers with a live read lease and how many requests each has running."""
        return {r: len(s.pumps) for r, s in self._sessions.items()}

    def metric_families(self) -> list[Any]:
        """The cluster's Prometheus metric families (workers, handoffs, pools)."""
        return [] if self.metrics is None else list(self.metrics.registry.collect())

    # ---- tear-down --------------------------------------------------------------------------

    async def shutdown(self, grace_s: float) -> int:
        """Refuse new requests, wait up to `grace_s` for running ones, then stop every worker.

        Returns how many requests were still running when the grace period ended.
        """
        self._closing = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        deadline = time.monotonic() + grace_s
        while self.cluster is not None and self.cluster.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = len(self.cluster.requests) if self.cluster is not None else 0
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self.cluster is not None:
            await self.cluster.shutdown()
        return left
