"""A router's view of a cluster that lives in its own Ray actor (see `cluster_actor`).

`connect` attaches to the batonserve cluster actor of a Ray namespace, starting it (and its
workers) when none runs yet; `RemoteCluster` implements `ClusterAPI` over it. The router keeps
no cluster state: one long-poll loop brings every stream's deltas in batches (and renews this
router's read lease), one loop caches readiness and server info for the health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import ray

from batonserve.cluster.api import (
    AdmissionRejected,
    ClusterUnavailable,
    GenerateRequest,
    ModelInfo,
    ServerInfo,
    TokenDelta,
)
from batonserve.cluster.cluster_actor import ACTOR_NAME, ClusterActor, PollBatch, StreamError
from batonserve.cluster.config import ServeConfig
from batonserve.cluster.env import keep_ray_on_loopback
from batonserve.cluster.placement import StartupError

if TYPE_CHECKING:
    from batonserve.workers.scripted_engine import ScriptedEngineConfig

log = logging.getLogger("batonserve.router")

POLL_S = 1.0  # one long-poll waits this long for new tokens
STATUS_S = 0.5  # readiness and server info refresh
CALL_TIMEOUT_S = 30.0  # a control call to the cluster actor that takes longer is reported


def unreachable(address: str, timeout: float = 5.0) -> str:
    """Why nothing answers at a `host:port` Ray address ('' when something does, or for 'auto').

    ray.init retries an address with no GCS behind it for minutes; a typo should fail at once."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in host:
        return ""
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        return str(e) or type(e).__name__
    return ""


def join_ray(address: str, namespace: str) -> None:
    """Connect this process to the Ray cluster at `address` as a quiet driver (once)."""
    if not address:
        raise ValueError("ray.address: attaching to a cluster needs a Ray address")
    if ray.is_initialized():
        return
    why = unreachable(address)
    if why:
        raise ValueError(f"ray.address: cannot reach Ray at {address}: {why}")
    keep_ray_on_loopback()
    ray.init(
        address=address,
        namespace=namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,  # worker logs stay in Ray's log files, not this process's output
    )


def find_actor(namespace: str) -> Any | None:
    """The cluster actor of `namespace`, or None when no batonserve runs there."""
    try:
        return ray.get_actor(ACTOR_NAME, namespace=namespace)
    except ValueError:
        return None


def _raise_for(err: StreamError) -> None:
    if err.kind == "rejected":
        raise AdmissionRejected(err.message, err.reason or "admission")
    if err.kind == "unavailable":
        raise ClusterUnavailable(err.message)
    if err.kind == "invalid":
        raise ValueError(err.message)
    raise RuntimeError(err.message)


async def _wait(ref: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)


async def connect(
    config: ServeConfig,
    progress: Callable[[str], None],
    *,
    scripted: ScriptedEngineConfig | None = None,
) -> RemoteCluster:
    """Attach to the batonserve cluster in config.ray.address, starting it if none runs.

    Raises StartupError when one runs with another config (saying what differs) or start-up fails.
    """
    t0 = time.monotonic()
    join_ray(config.ray.address, config.ray.namespace)
    ns = config.ray.namespace
    actor = (
        ray.remote(ClusterActor)
        .options(
            name=ACTOR_NAME,
            namespace=ns,
            lifetime="detached",  # owned by no router: it and its workers outlive them all
            get_if_exists=True,
            num_cpus=0,
            max_restarts=0,
            max_concurrency=1000,
        )
        .remote()
    )
    ident = await _wait(actor.identity.remote())
    if ident["config"] is not None:
        progress(f"attaching to the running batonserve cluster ({len(ident['workers'])} workers)")
    else:
        progress(f"starting the batonserve cluster actor {ACTOR_NAME!r} in namespace {ns!r}")
    # An attaching router relays only what happens from now on, not the first start's lines.
    seen = 0 if ident["config"] is None else len(await _wait(actor.progress.remote(0)))
    start = asyncio.wrap_future(actor.start.remote(config, scripted).future())
    while True:  # relay start-up progress (worker by worker) while the actor starts the pools
        done, _ = await asyncio.wait({start}, timeout=0.5)
        lines = await _wait(actor.progress.remote(seen))
        seen += len(lines)
        for line in lines:
            progress(line)
        if done:
            break
    kind, message = start.result()
    if kind == "mismatch":
        raise StartupError(
            f"a batonserve cluster with another config already runs in Ray namespace {ns!r} at "
            f"{config.ray.address}: {message}. Serve the same config, or stop it first "
            f"(`batonserve stop --ray-address {config.ray.address}`)"
        )
    if kind != "ok":
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)  # a later serve starts afresh
        raise StartupError(message)
    if message:
        progress(f"replicas differ, the running cluster's are kept: {message}")
    info: ModelInfo = await _wait(actor.model_info.remote())
    cluster = RemoteCluster(actor, info, config)
    await cluster.start()
    progress(
        f"attached to the cluster in {time.monotonic() - t0:.1f}s (router {cluster.router_id})"
    )
    return cluster


class RemoteCluster:
    """ClusterAPI over the cluster actor; this router's requests form one session there."""

    def __init__(self, actor: Any, info: ModelInfo, config: ServeConfig) -> None:
        self.actor = actor
        self.config = config
        self.router_id = uuid.uuid4().hex[:12]
        self._model_info = info
        self._ready = False
        self._server_info = ServerInfo(())
        self._queues: dict[str, asyncio.Queue[TokenDelta | StreamError | BaseException]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._aborts: set[asyncio.Task[None]] = set()
        self._gone: str = ""  # why the cluster actor cannot be reached any more
        self._metrics_server: Any = None

    async def start(self) -> None:
        """Start the poll and status loops (the first status is fetched before returning)."""
        await self._refresh()
        self._tasks = [
            asyncio.ensure_future(self._poll_loop()),
            asyncio.ensure_future(self._status_loop()),
        ]

    # ---- ClusterAPI --------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        """The served model."""
        return self._model_info

    def server_info(self) -> ServerInfo:
        """Pools and workers, as of the last refresh (every STATUS_S)."""
        return self._server_info

    def ready(self) -> bool:
        """The cluster's readiness as of the last refresh; False once its actor is gone."""
        return self._ready and not self._gone

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream a request (AdmissionRejected / ClusterUnavailable on the first read)."""
        return self._stream(request)

    async def abort(self, request_id: str) -> None:
        """Stop a request of this router in the cluster; idempotent."""
        if self._gone:
            return
        with contextlib.suppress(Exception):
            await _wait(self.actor.abort.remote(self.router_id, self._cluster_id(request_id)))

    def attach_metrics(self, metrics: Any) -> None:
        """Kept for the metrics endpoint (request series are this router's own)."""
        self._metrics = metrics

    def start_metrics_server(self, metrics: Any, host: str, port: int) -> int:
        """Serve /metrics: this router's request series merged with the cluster's series."""
        from batonserve.cluster.metrics_remote import serve_merged

        self._metrics_server, bound = serve_merged(metrics.registry, self._families, host, port)
        return bound

    def set_replicas(self, pool: str, n: int) -> None:
        """Desired size of `pool` (the config watcher's live change); refusals are logged."""

        def done(ref: Any) -> None:
            try:
                why = ref.result()
            except Exception as e:
                why = _short(e)
            if why:
                log.warning("pool %s replicas %d not applied: %s", pool, n, why)

        asyncio.wrap_future(self.actor.set_replicas.remote(pool, n).future()).add_done_callback(
            done
        )

    async def shutdown(self) -> None:
        """Leave the cluster running: abort this router's requests there and disconnect."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self._gone:
            with contextlib.suppress(Exception):
                await _wait(self.actor.leave.remote(self.router_id), 10)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        ray.shutdown()

    # ---- streams -----------------------------------------------------------------------------

    def _cluster_id(self, request_id: str) -> str:
        # Two routers may be handed the same client request id; the cluster must not mix them.
        return f"{self.router_id}:{request_id}"

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if self._gone:
            raise ClusterUnavailable(self._gone)
        cid = self._cluster_id(request.request_id)
        q: asyncio.Queue[TokenDelta | StreamError | BaseException] = asyncio.Queue()
        self._queues[cid] = q
        ended = False
        try:
            try:
                err = await _wait(
                    self.actor.submit.remote(self.router_id, replace(request, request_id=cid))
                )
            except Exception as e:  # never INTERNAL: the cluster could not take it
                if isinstance(e, ray.exceptions.ActorDiedError) or not await self._alive():
                    self._lost(e)
                    raise ClusterUnavailable(self._gone) from None
                why = f"the batonserve cluster did not answer: {_short(e)}"
                raise ClusterUnavailable(why) from None
            if err is not None:
                ended = True
                _raise_for(err)
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                if isinstance(item, StreamError):
                    ended = True
                    _raise_for(item)
                assert isinstance(item, TokenDelta)
                if item.finish_reason is not None:
                    ended = True
                yield item
                if ended:
                    return
        finally:
            self._queues.pop(cid, None)
            if not ended and not self._gone:  # the reader went away: free its blocks
                task = asyncio.ensure_future(self.abort(request.request_id))
                self._aborts.add(task)
                task.add_done_callback(self._aborts.discard)

    async def _poll_loop(self) -> None:
        while not self._gone:
            try:
                batch: PollBatch = await _wait(
                    self.actor.poll.remote(self.router_id, POLL_S), POLL_S + CALL_TIMEOUT_S
                )
            except asyncio.CancelledError:
                raise
            except ray.exceptions.ActorDiedError as e:
                self._lost(e)
                return
            except Exception as e:  # unreachable for a moment: say so, keep trying
                log.warning("polling the cluster actor failed: %s", _short(e))
                if not await self._alive():
                    self._lost(e)
                    return
                await asyncio.sleep(0.5)
                continue
            shift = time.monotonic() - batch.now  # the actor's clock onto this process's
            for cid, items in batch.items.items():
                q = self._queues.get(cid)
                if q is None:
                    continue  # aborted here meanwhile
                for item in items:
                    if isinstance(item, TokenDelta) and item.scheduled_at is not None:
                        item = replace(item, scheduled_at=item.scheduled_at + shift)
                    q.put_nowait(item)

    async def _alive(self) -> bool:
        """Whether Ray still lists this router's cluster actor under its name.

        A call to a dead actor does not always fail with ActorDiedError (one killed by Ray's
        memory monitor fails with OutOfMemoryError), and another router may meanwhile have
        started a new actor under the same name: so ask the GCS and compare actor ids.
        """
        try:
            now = await asyncio.to_thread(find_actor, self.config.ray.namespace)
        except Exception as e:
            log.warning("cannot ask Ray whether the cluster actor lives: %s", _short(e))
            return True  # cannot tell: keep trying
        return now is not None and now._actor_id == self.actor._actor_id

    async def _refresh(self) -> None:
        self._ready, self._server_info = await _wait(self.actor.status.remote(), 10)

    async def _status_loop(self) -> None:
        while not self._gone:
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except ray.exceptions.ActorDiedError as e:
                self._lost(e)
                return
            except Exception as e:
                self._ready = False
                log.warning("the cluster actor did not answer a status call: %s", _short(e))
                if not await self._alive():
                    self._lost(e)
                    return
            await asyncio.sleep(STATUS_S)

    def _lost(self, e: BaseException) -> None:
        """The cluster actor is gone: every open stream ends UNAVAILABLE, new ones are refused."""
        if self._gone:
            return
        self._gone = (
            f"the batonserve cluster ({ACTOR_NAME!r} in Ray namespace "
            f"{self.config.ray.namespace!r}) is gone: {_short(e)}; restart `batonserve serve` "
            "to start a new one"
        )
        self._ready = False
        log.error("%s", self._gone)
        for q in self._queues.values():
            q.put_nowait(ClusterUnavailable(self._gone))

    def _families(self) -> list[Any]:
        """The cluster actor's metric families (called from the metrics HTTP thread)."""
        if self._gone:
            return []
        return list(ray.get(self.actor.metric_families.remote(), timeout=5))


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
