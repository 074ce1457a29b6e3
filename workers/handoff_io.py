"""Both ends of a layer-wise KV handoff inside a worker: the exporter and the importer.

Prefill side: after each layer of each step, the KV that step wrote for a prefill-only request
is read out of the paged cache and queued on the transport while the next layer computes; the
first token follows as a final marker. Decode side: chunks land in a contiguous staging buffer
per handoff; only when every layer of every prompt position and the first token are there is
the request imported into the engine, so a partial or aborted handoff is never decoded from.
A complete handoff that does not fit the engine's free KV blocks waits (first come, first
served) until decoding frees room, instead of failing and being prefilled again; its blocks
count as reserved from `begin` on, as the simulator models it.

Between tensor-parallel groups each rank moves its own KV heads (`workers/tp/kv_lanes.py`): the
exporter sends through `KVLanes`, and the importer stages rank 0's heads and waits until every
follower rank reports its share complete.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batonserve.workers.engine_protocol import WorkerEngine
from batonserve.workers.kv_transfer.base import FINAL_LAYER, KVChunk, KVSpec, KVTransport
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.scheduler import StepPlan
from batonserve.workers.tp.kv_lanes import KVLanes, peer_size, send_heads
from batonserve.workers.tp.kv_routes import head_routes
from batonserve.workers.worker_types import HandoffEvent, HandoffSpec


def block_slots(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Cache slots (int64 [end - start]) of positions [start, end) under a block table."""
    pos = torch.arange(start, end, dtype=torch.int64)
    first, last = start // block_size, (end - 1) // block_size + 1
    blocks = torch.tensor(block_ids[first:last], dtype=torch.int64)
    return blocks[pos // block_size - first] * block_size + pos % block_size


def send_layer(
    engine: WorkerEngine,
    transport: KVTransport,
    dst: str,
    handoff_id: int,
    layer: int,
    slots: torch.Tensor,
    runs: Sequence[tuple[int, int, int]],
) -> int:
    """A TP=1 sender (a ring member): read one layer's KV at `slots` [n] and queue each rank of
    `dst` its heads, one chunk per run (row_start, row_end, first_position) of consecutive
    positions; returns the bytes queued. It raises whatever the transport raises."""
    routes = head_routes(transport.spec.num_kv_heads, 1, peer_size(transport, dst))
    return send_heads(engine.read_kv, transport, routes, 0, dst, handoff_id, layer, slots, runs)


@dataclass
class _Export:
    spec: HandoffSpec
    sent_upto: int = 0  # prompt positions whose KV (all layers) is queued
    nbytes: int = 0
    prefilled_at: float = 0.0  # monotonic time the first token went out (0: still prefilling)


class KVExporter:
    """Prefill side: streams the KV of prefill-only requests to their decode workers."""

    def __init__(
        self, engine: WorkerEngine, transport: KVTransport, spec: KVSpec, lanes: KVLanes
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.spec = spec
        self.lanes = lanes
        self.exports: dict[str, _Export] = {}
        self.failed: list[str] = []  # see take_failed

    def start(self, spec: HandoffSpec) -> None:
        """Track a new outgoing handoff (its request was just added as prefill-only)."""
        self.exports[spec.request_id] = _Export(spec)

    def on_layer(self, layer: int, plan: StepPlan) -> list[HandoffEvent]:
        """Queue the KV this step wrote at `layer` for every exporting request in the plan."""
        failed: list[HandoffEvent] = []
        last = layer == self.spec.num_layers - 1
        for seq in plan.seqs:
            ex = self.exports.get(seq.request_id)
            if ex is None:
                continue
            # Positions from sent_upto (not start_pos): a prefix-cache hit is sent with chunk one.
            end = min(seq.start_pos + len(seq.token_ids), ex.spec.prompt_len)
            if end <= ex.sent_upto:
                continue
            slots = block_slots(seq.block_ids, self.spec.block_size, ex.sent_upto, end)
            run = (0, end - ex.sent_upto, ex.sent_upto)
            sp = ex.spec
            try:
                ex.nbytes += self.lanes.send(sp.dst, sp.handoff_id, layer, slots, [run])
            except Exception as e:
                failed.append(self._fail(ex, str(e)))
                continue
            if last:
                ex.sent_upto = end
        return failed

    def on_output(self, out: CoreOutput) -> HandoffEvent | None:
        """After a step: send the first-token marker once the prompt is done."""
        ex = self.exports.get(out.request_id)
        if ex is None:
            return None
        if out.finished:  # ended at its first token (stop, length or abort): nothing to hand off
            del self.exports[out.request_id]
            return None
        if out.prefilled and out.new_token_ids:
            assert ex.sent_upto == ex.spec.prompt_len, "every prompt position went out"
            ex.prefilled_at = time.monotonic()
            marker = KVChunk(
                ex.spec.handoff_id, FINAL_LAYER, ex.spec.prompt_len, None, out.new_token_ids[-1]
            )
            try:
                self.transport.send(ex.spec.dst, marker)
            except Exception as e:
                return self._fail(ex, str(e))
        return None

    def drop(self, request_id: str) -> _Export | None:
        """Stop tracking (released after the ack, or aborted)."""
        return self.exports.pop(request_id, None)

    def fail_peer(self, peer: str, detail: str) -> list[HandoffEvent]:
        """Every export to `peer` has failed."""
        return [self._fail(ex, detail) for ex in list(self.exports.values()) if ex.spec.dst == peer]

    def in_progress(self) -> list[int]:
        """Handoffs still queued or prefilling here (the cluster renews their leases)."""
        return [ex.spec.handoff_id for ex in self.exports.values() if ex.prefilled_at == 0]

    def stale(self, older_than_s: float, vouched: Collection[int] = ()) -> list[HandoffEvent]:
        """Fail exports prefilled longer ago than `older_than_s` and still not released.

        A backstop only: the cluster's ledger ends leases first; this frees pinned blocks even
        if the cluster that owned the handoff is gone. Handoffs in `vouched` (their owner said
        lately that they are live) are left to the owner.
        """
        cut = time.monotonic() - older_than_s
        old = [
            ex
            for ex in self.exports.values()
            if 0 < ex.prefilled_at < cut and ex.spec.handoff_id not in vouched
        ]
        return [self._fail(ex, "lease backstop: never released") for ex in old]

    def _fail(self, ex: _Export, detail: str) -> HandoffEvent:
        self.exports.pop(ex.spec.request_id, None)
        self.failed.append(ex.spec.request_id)
        return HandoffEvent(ex.spec.handoff_id, ex.spec.request_id, "failed", ex.nbytes, detail)

    def take_failed(self) -> list[str]:
        """Requests whose export failed since the last call: the worker ends them in the engine.

        A failed handoff is never resumed here (the cluster retries on a fresh attempt id), and
        once untracked no backstop would ever free its pinned blocks.
        """
        failed, self.failed = self.failed, []
        return failed


class StagedKV:
    """One rank's heads [first, stop) of one handoff, staged as chunks land (any order)."""

    def __init__(self, spec: KVSpec, prompt_len: int, heads: tuple[int, int], device: Any) -> None:
        self.first, n = heads[0], heads[1] - heads[0]
        shape = (spec.num_layers, 2, prompt_len, n, spec.head_dim)
        self.buf = torch.empty(shape, dtype=spec.torch_dtype, device=device)
        self.got = [0] * spec.num_layers  # (position, head) pairs received per layer
        self.want = prompt_len * n
        self.nbytes = 0

    def add(self, chunk: KVChunk) -> None:
        """Stage a chunk of KV (some of this rank's heads at some positions of one layer)."""
        assert chunk.kv is not None
        n, h = chunk.num_tokens, chunk.head - self.first
        self.buf[chunk.layer, :, chunk.start : chunk.start + n, h : h + chunk.num_heads] = chunk.kv
        self.got[chunk.layer] += n * chunk.num_heads
        self.nbytes += chunk.kv.numel() * chunk.kv.element_size()

    @property
    def full(self) -> bool:
        """Every layer of every position of every head here."""
        return all(g == self.want for g in self.got)


@dataclass
class _Import:
    spec: HandoffSpec
    staged: StagedKV  # rank 0's heads
    ranks: int = 1  # of this TP group; every rank stages as many heads
    ranks_left: set[int] = field(default_factory=set)  # follower ranks whose share is not in
    first_token: int = -1
    queued: bool = False
    created: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return self.staged.nbytes * self.ranks  # rank 0's progress stands for every rank's

    @property
    def complete(self) -> bool:
        return self.first_token >= 0 and not self.ranks_left and self.staged.full


class KVImporter:
    """Decode side: stages incoming chunks and imports a request once all of it has arrived."""

    def __init__(
        self, engine: WorkerEngine, spec: KVSpec, device: torch.device, lanes: KVLanes
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.device = device
        self.lanes = lanes
        self.imports: dict[int, _Import] = {}
        self.waiting: deque[int] = deque()  # complete handoffs waiting for free blocks, FCFS
        self._lock = threading.Lock()  # chunks arrive on transport threads

    def begin(self, spec: HandoffSpec) -> None:
        """Expect a handoff: allocate rank 0's staging buffer (`KVLanes.begin` did the
        followers')."""
        staged = StagedKV(self.spec, spec.prompt_len, self.lanes.heads, self.device)
        left = set(range(1, self.lanes.size))
        with self._lock:
            self.imports[spec.handoff_id] = _Import(spec, staged, self.lanes.size, left)

    def on_chunk(self, chunk: KVChunk) -> bool:
        """Stage a chunk; True when its handoff just became complete (commit it on the loop)."""
        with self._lock:
            imp = self.imports.get(chunk.handoff_id)
            if imp is None:
                return False  # an aborted or unknown attempt: dropped, never decoded from
            if chunk.layer == FINAL_LAYER:
                imp.first_token = chunk.first_token
            else:
                imp.staged.add(chunk)
            return self._became_complete(imp)

    def rank_done(self, handoff_id: int, rank: int) -> bool:
        """A follower rank staged its whole share; True when the handoff just became complete."""
        with self._lock:
            imp = self.imports.get(handoff_id)
            if imp is None:
                return False
            imp.ranks_left.discard(rank)
            return self._became_complete(imp)

    def _became_complete(self, imp: _Import) -> bool:
        if imp.complete and not imp.queued:
            imp.queued = True
            return True
        return False

    def commit(self, handoff_id: int) -> list[HandoffEvent]:
        """A handoff became complete (loop thread): import it, or queue it until it fits."""
        with self._lock:
            if handoff_id in self.imports:
                self.waiting.append(handoff_id)
        return self.drain()

    def drain(self) -> list[HandoffEvent]:
        """Import waiting handoffs in arrival order while the engine has the blocks (loop thread).

        A later handoff never overtakes the head: a long prompt would otherwise wait forever.
        """
        events: list[HandoffEvent] = []
        while True:
            with self._lock:
                while self.waiting and self.waiting[0] not in self.imports:
                    self.waiting.popleft()  # aborted while it waited
                if not self.waiting:
                    return events
                imp = self.imports[self.waiting[0]]
                need = self.blocks_for(imp.spec.prompt_len)
                if need > self.engine.pool.num_free_blocks and need <= self.engine.pool.num_blocks:
                    return events  # decoding frees blocks; the worker calls drain after each step
                self.waiting.popleft()
                del self.imports[imp.spec.handoff_id]
            events.append(self._import(imp))

    def blocks_for(self, num_tokens: int) -> int:
        """KV blocks a prompt of `num_tokens` takes in the engine."""
        return -(-num_tokens // self.spec.block_size)

    def reserved_blocks(self) -> int:
        """Blocks promised to handoffs begun here and not yet imported (hidden from the CLS)."""
        with self._lock:
            return sum(self.blocks_for(i.spec.prompt_len) for i in self.imports.values())

    def in_progress(self) -> list[int]:
        """Complete handoffs waiting for room (the cluster renews their leases meanwhile)."""
        with self._lock:
            return [h for h in self.waiting if h in self.imports]

    def _import(self, imp: _Import) -> HandoffEvent:
        handoff_id = imp.spec.handoff_id
        sp = imp.spec
        try:
            slots = self.engine.import_request(
                sp.request_id, list(sp.prompt_token_ids), imp.first_token, sp.params
            )
            buf, at = imp.staged.buf, slots[: sp.prompt_len]
            for layer in range(self.spec.num_layers):  # rank 0's heads
                self.engine.write_kv(layer, at, buf[layer, 0], buf[layer, 1])
            self.lanes.commit(handoff_id, at)  # every follower writes its own
            self.engine.commit_import(sp.request_id)
        except Exception as e:
            self.lanes.drop(handoff_id)
            self.engine.abort_request(sp.request_id)
            return HandoffEvent(handoff_id, sp.request_id, "failed", imp.nbytes, f"import: {e}")
        return HandoffEvent(handoff_id, sp.request_id, "committed", imp.nbytes)

    def drop_request(self, request_id: str) -> None:
        """Forget every staged handoff of a request (aborted)."""
        with self._lock:
            gone = [h for h, i in self.imports.items() if i.spec.request_id == request_id]
            for hid in gone:
                del self.imports[hid]
        for hid in gone:
            self.lanes.drop(hid)

    def fail_peer(self, peer: str, detail: str) -> list[HandoffEvent]:
        """Every import from `peer` has failed."""
        with self._lock:
            dead = [i for i in self.imports.values() if i.spec.src == peer]
            for i in dead:
                del self.imports[i.spec.handoff_id]
        for i in dead:
            self.lanes.drop(i.spec.handoff_id)
        return [
            HandoffEvent(i.spec.handoff_id, i.spec.request_id, "failed", i.nbytes, detail)
            for i in dead
        ]

    def stale(self, older_than_s: float, vouched: Collection[int] = ()) -> list[HandoffEvent]:
        """Drop staged handoffs begun longer ago than `older_than_s` (backstop, as above)."""
        cut = time.monotonic() - older_than_s
        with self._lock:
            old = [
                i
                for i in self.imports.values()
                if i.created < cut and i.spec.handoff_id not in vouched
            ]
            for i in old:
                del self.imports[i.spec.handoff_id]
        for i in old:
            self.lanes.drop(i.spec.handoff_id)
        return [
            HandoffEvent(i.spec.handoff_id, i.spec.request_id, "failed", i.nbytes, "lease backstop")
            for i in old
        ]

    def __len__(self) -> int:
        with self._lock:
            return len(self.imports)
