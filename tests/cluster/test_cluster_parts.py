"""Two parts of `Cluster` on their own: the request table (outputs of abandoned attempts find
nothing) and the worker monitor (a poll's result or a worker's loss, as typed events)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.request_state import RequestState
from batonserve.cluster.request_table import RequestTable
from batonserve.cluster.worker_monitor import WorkerEvent, WorkerLost, WorkerMonitor, WorkerPolled
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.worker_types import PollResult, WorkerStats


def test_only_the_current_attempt_is_routed() -> None:
    table = RequestTable()
    st = RequestState(GenerateRequest("r", (1, 2), SamplingParams(max_tokens=4)))
    table.add(st)
    first = st.next_attempt("p", "d")
    table.bind(st, first)
    assert table.current(first.worker_request_id) == (st, first)
    second = st.next_attempt("p", "d")  # a resume: the first attempt is abandoned
    table.bind(st, second)
    assert table.current(first.worker_request_id) is None
    table.unbind(second)
    assert table.current(second.worker_request_id) is None
    assert "r" in table and len(table) == 1 and table.values() == [st]
    newer = RequestState(GenerateRequest("r", (3,), SamplingParams(max_tokens=4)))
    table.remove(st)
    table.add(newer)
    table.remove(st)  # a late end of the old request leaves the newer one alone
    assert table.get("r") is newer


def _stats(healthy: bool) -> WorkerStats:
    err = "" if healthy else "boom"
    return WorkerStats(
        "w", "decode", "decode", healthy, 0, 0, 0, 0, 8, 8, 4, 0.0, 0, 0, 1, 0, 0, err
    )


class _Actor:
    """Answers polls from a script: a PollResult, or an exception to raise."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.asked: list[tuple[int, ...]] = []
        self.poll = SimpleNamespace(remote=self._poll)

    async def _poll(self, timeout_s: float, owned: tuple[int, ...]) -> PollResult:
        self.asked.append(owned)
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]


def _watch(script: list[Any]) -> tuple[list[WorkerEvent], _Actor]:
    actor = _Actor(script)
    handle = SimpleNamespace(incarnation=3, actor=actor)
    controller = SimpleNamespace(workers={"w": handle})
    seen: list[WorkerEvent] = []

    async def run() -> None:
        tasks: list[asyncio.Task[None]] = []
        monitor = WorkerMonitor(
            controller,  # type: ignore[arg-type]
            seen.append,
            lambda name: (7,),
            lambda coro: tasks.append(asyncio.ensure_future(coro)),
        )
        monitor.watch("w", 3)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)

    asyncio.run(run())
    return seen, actor


def test_the_monitor_reports_polls_then_a_failed_poll() -> None:
    ok = PollResult((), (), _stats(True))
    seen, actor = _watch([ok, RuntimeError("actor died")])
    assert seen == [WorkerPolled("w", ok), WorkerLost("w", 3, "poll failed: RuntimeError")]
    assert actor.asked == [(7,), (7,)]  # each poll names the handoffs the cluster still owns


def test_an_engine_error_is_a_lost_worker_after_its_last_results() -> None:
    bad = PollResult((), (), _stats(False))
    seen, _ = _watch([bad])
    assert seen == [WorkerPolled("w", bad), WorkerLost("w", 3, "engine error: boom")]
