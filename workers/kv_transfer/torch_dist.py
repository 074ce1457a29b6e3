"""torch.distributed point-to-point transport: one two-rank process group per direction of a pair.

A channel src -> dst is its own process group (rank 0 sends, rank 1 receives), so concurrent
handoffs between other pairs never share a stream, and a blocked receive never stalls a send the
other way (NCCL serializes all ops of one communicator). Every message is a small int64 header
[handoff_id, layer, start, n_tokens, first_token, head, n_heads] followed, when n_tokens > 0, by
one contiguous [2, n_tokens, n_heads, head_dim] tensor, so chunks of concurrent handoffs can't be
confused. A worker of TP size N has one transport per rank; a lane (ChannelAddress.lane) is the
channel of one sender rank to one receiver rank, all lanes of a pair meeting on one rendezvous.
Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import threading
from typing import Any

import torch
import torch.distributed as dist

from batonserve.workers.kv_transfer.base import (
    ChannelAddress,
    KVChunk,
    KVTransferError,
    KVTransport,
    split_peer,
)

_TAG = 0
_HEADER = 7
_IDLE = datetime.timedelta(days=7)  # a receiver waits this long for the next header


def _make_pg(store: Any, rank: int, device: torch.device, host: str) -> Any:
    """A two-rank process group on `store` (blocks until both ranks join)."""
    if device.type == "cuda":
        from torch._C._distributed_c10d import ProcessGroupNCCL

        nccl_opts = ProcessGroupNCCL.Options()
        nccl_opts._timeout = _IDLE
        return ProcessGroupNCCL(store, rank, 2, nccl_opts)
    from torch._C._distributed_c10d import ProcessGroupGloo

    opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._timeout = _IDLE
    opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
    return ProcessGroupGloo(store, rank, 2, opts)


class _Channel:
    """One direction of a pair: a process group and the thread that drives it."""

    def __init__(self, transport: TorchDistTransport, peer: str, pg: Any, sender: bool) -> None:
        self.t = transport
        self.peer = peer
        self.pg = pg
        self.sender = sender
        self.closed = False
        self.queue: queue.Queue[KVChunk | None] = queue.Queue()
        self.timeout = datetime.timedelta(seconds=transport.cfg.send_timeout_s)
        target = self._send_loop if sender else self._recv_loop
        self.thread = threading.Thread(target=target, name=f"kv-{peer}", daemon=True)
        self.thread.start()

    def _send_loop(self) -> None:
        dev = self.t.device
        while True:
            chunk = self.queue.get()
            if chunk is None or self.closed:
                return
            try:
                header = torch.tensor(
                    [
                        chunk.handoff_id,
                        chunk.layer,
                        chunk.start,
                        chunk.num_tokens,
                        chunk.first_token,
                        chunk.head,
                        chunk.num_heads,
                    ],
                    dtype=torch.int64,
                    device=dev,
                )
                self.pg.send([header], 1, _TAG).wait(self.timeout)
                if chunk.kv is not None:
                    self.pg.send([chunk.kv.contiguous()], 1, _TAG).wait(self.timeout)
            except Exception as e:
                self._fail(e)
                return

    def _recv_loop(self) -> None:
        spec, dev = self.t.spec, self.t.device
        header = torch.empty(_HEADER, dtype=torch.int64, device=dev)
        while not self.closed:
            try:
                self.pg.recv([header], 0, _TAG).wait(_IDLE)
                hid, layer, start, n, first, head, heads = (int(x) for x in header.tolist())
                kv = None
                if n > 0:
                    # [2, n, heads, head_dim], fresh per chunk: the consumer keeps it.
                    shape = (2, n, heads, spec.head_dim)
                    kv = torch.empty(shape, dtype=spec.torch_dtype, device=dev)
                    self.pg.recv([kv], 0, _TAG).wait(self.timeout)
            except Exception as e:
                self._fail(e)
                return
            self.t.deliver(self.peer, KVChunk(hid, layer, start, kv, first, head))

    def _fail(self, e: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        self.t.drop_channel(self)
        way = f"{self.t.local} -> {self.peer}" if self.sender else f"{self.peer} -> {self.t.local}"
        self.t.on_error(self.peer, KVTransferError(f"KV channel {way} failed: {e}"))

    def close(self) -> None:
        self.closed = True
        self.queue.put(None)
        with contextlib.suppress(Exception):  # already torn down by a dead peer
            self.pg.abort()


class TorchDistTransport(KVTransport):
    """Point-to-point KV transport over per-pair torch.distributed process groups."""

    def __init__(self, *args: Any, device: str = "cpu", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = torch.device(device)
        self._send: dict[str, _Channel] = {}
        self._recv: dict[str, _Channel] = {}
        self._stores: dict[str, Any] = {}  # sender-side TCPStore masters awaiting connect
        self._generation = 0

    def listen(self, peer: str) -> ChannelAddress:
        """Open a TCP store for the receiver's rendezvous (this worker will be rank 0)."""
        if peer == self.local:
            raise KVTransferError(f"{self.local}: a worker never sends KV to itself")
        timeout = datetime.timedelta(seconds=self.cfg.connect_timeout_s)
        store = dist.TCPStore(self.host, 0, 2, True, timeout=timeout, wait_for_workers=False)
        with self._lock:
            self._generation += 1
            self._stores[peer] = store
            return ChannelAddress(self.host, int(store.port), self._generation)

    def connect(self, peer: str, addr: ChannelAddress, sender: bool) -> None:
        """Build the process group; both sides call this at the same time."""
        timeout = datetime.timedelta(seconds=self.cfg.connect_timeout_s)
        store = None
        if sender and not addr.lane:  # rank 0 to rank 0: the store `listen` opened
            with self._lock:
                store = self._stores.pop(peer, None)
            if store is None:  # close_peer ran between listen and connect: the peer is gone
                raise KVTransferError(f"{self.local}: no rendezvous open with {peer} (closed)")
        if store is None:  # the receiver, or another lane: a client of the sender's store
            store = dist.TCPStore(addr.host, addr.port, 2, False, timeout=timeout)
        lane = f"{addr.lane}/" if addr.lane else ""
        prefix = dist.PrefixStore(f"kv/{addr.generation}/{lane}", store)
        pg = _make_pg(prefix, 0 if sender else 1, self.device, self.host)
        chan = _Channel(self, peer, pg, sender)
        chan.store = store  # type: ignore[attr-defined]  # keep the master alive
        table = self._send if sender else self._recv
        with self._lock:
            old = table.pop(peer, None)
            table[peer] = chan
        if old is not None:
            old.close()

    def has_channel(self, peer: str, sender: bool) -> bool:
        """True when a live channel to (sender) or from `peer` exists."""
        with self._lock:
            return peer in (self._send if sender else self._recv)

    def send(self, peer: str, chunk: KVChunk) -> None:
        """Queue `chunk` on the channel to `peer` (KVTransferError if there is none)."""
        with self._lock:
            chan = self._send.get(peer)
        if chan is None:
            raise KVTransferError(f"{self.local}: no KV channel to {peer}")
        chan.queue.put(chunk)

    def drop_channel(self, chan: _Channel) -> None:
        """Forget a failed channel so the next pairing rebuilds it."""
        with self._lock:
            table = self._send if chan.sender else self._recv
            if table.get(chan.peer) is chan:
                del table[chan.peer]

    def close_peer(self, peer: str) -> None:
        """Tear down both directions with `peer` (a worker: every rank's lane of it)."""
        with self._lock:
            keys = {k for k in (*self._send, *self._recv) if peer in (k, split_peer(k)[0])}
            chans = [
                c for k in keys for c in (self._send.pop(k, None), self._recv.pop(k, None)) if c
            ]
            self._stores.pop(peer, None)
        for c in chans:
            c.close()

    def close(self) -> None:
        """Tear down every channel."""
        with self._lock:
            peers = set(self._send) | set(self._recv)
        for p in peers:
            self.close_peer(p)
