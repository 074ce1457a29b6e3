"""Ray object store transport: each layer's KV is put in the object store and its reference
pushed to the decode actor's `kv_push` method, which Ray resolves (copying across nodes). A chunk
for a follower rank of a TP worker goes through that worker's `kv_push_lane`, which hands the
reference on unresolved: the tensor moves from the sending rank's node to the receiving rank's."""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

from batonserve.workers.kv_transfer.base import KVChunk, KVTransferError, KVTransport, split_peer


class ObjectStoreTransport(KVTransport):
    """KV over the Ray object store; no channel setup, peers are found by actor name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handles: dict[str, Any] = {}
        self._queue: queue.Queue[tuple[str, KVChunk] | None] = queue.Queue()
        # One thread keeps the per-peer order and keeps ray.put off the compute thread.
        self._thread = threading.Thread(target=self._loop, name="kv-objstore", daemon=True)
        self._thread.start()

    def send(self, peer: str, chunk: KVChunk) -> None:
        """Queue `chunk` for `peer`."""
        if peer == self.local:
            raise KVTransferError(f"{self.local}: a worker never sends KV to itself")
        self._queue.put((peer, chunk))

    def _loop(self) -> None:
        import ray

        while True:
            item = self._queue.get()
            if item is None:
                return
            peer, chunk = item
            worker, rank = split_peer(peer)
            try:
                handle = self._handles.get(worker)
                if handle is None:
                    handle = ray.get_actor(worker, namespace=self.namespace)
                    self._handles[worker] = handle
                ref = None if chunk.kv is None else ray.put(chunk.kv.cpu())
                meta = dataclasses.replace(chunk, kv=None)
                if rank == 0:
                    handle.kv_push.remote(self.local, meta, ref)
                else:  # nested in a list: rank 0 passes the reference on without fetching it
                    handle.kv_push_lane.remote(rank, self.local, meta, [ref])
            except Exception as e:
                self._handles.pop(worker, None)
                self.on_error(peer, KVTransferError(f"KV push {self.local} -> {peer} failed: {e}"))

    def close_peer(self, peer: str) -> None:
        """Forget the peer's (possibly dead) actor handle."""
        self._handles.pop(split_peer(peer)[0], None)

    def close(self) -> None:
        """Stop the sender thread."""
        self._queue.put(None)
