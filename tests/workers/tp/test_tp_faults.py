"""A TP group never hangs: a rank that dies, or one that stays silent, makes the others'
all-reduce fail within the group's timeout with an error (which TPRunner turns into TPError)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from testkit.ports import free_port

from batonserve.workers.tp import TPShard

TIMEOUT_S = 3.0


def _dead_or_silent(rank: int, world: int, how: str) -> dict[str, Any]:
    """Rank 1 exits (or sleeps past the timeout) instead of joining the second all-reduce."""
    tp = TPShard(rank, world)
    x = torch.ones(4)
    tp.all_reduce(x)  # the group works
    if rank == 1:
        if how == "dead":
            os._exit(0)
        time.sleep(TIMEOUT_S * 3)
        return {"error": ""}
    start = time.monotonic()
    try:
        tp.all_reduce(torch.ones(4))
    except RuntimeError as e:
        return {"error": str(e), "waited": time.monotonic() - start, "first": x.tolist()}
    return {"error": "", "waited": time.monotonic() - start}


@pytest.mark.parametrize("how", ["dead", "silent"])
def test_collective_fails_instead_of_hanging(how: str, tmp_path: Path) -> None:
    """Rank 0's all-reduce raises within the group timeout (plus slack) when rank 1 is gone."""
    r0 = _run(how, tmp_path)
    print(f"{how}: rank 0 raised after {r0['waited']:.2f} s: {r0['error'][:120]}")
    assert r0["first"] == [2.0] * 4
    assert r0["error"], "rank 0's all-reduce returned with its peer gone"
    assert r0["waited"] < TIMEOUT_S + 10


def _run(how: str, tmp: Path) -> dict[str, Any]:
    """Two ranks with a short group timeout; rank 1 may exit without a result."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, 2, port, how, str(tmp)), daemon=True) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung past 120 s")
    rec: dict[str, Any] = torch.load(tmp / "rank0.pt", weights_only=False)
    return rec


def _child(rank: int, world: int, port: int, how: str, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    result = _dead_or_silent(rank, world, how)
    if rank == 0:
        torch.save(result, Path(out) / "rank0.pt")
    os._exit(0)  # no destroy_process_group: the peer may be gone
