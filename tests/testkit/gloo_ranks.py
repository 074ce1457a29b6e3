"""Spawn N gloo ranks on 127.0.0.1 that run one function each; bounded in time, results returned
(the sequence-, expert- and tensor-parallel tests share it).

Each rank's return value (any torch.save-able object) or its error comes back through a file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testkit.ports import free_port


def _entry(
    rank: int,
    world: int,
    port: int,
    timeout_s: float,
    threads: int,
    fn: Callable[[int, int, Any], Any],
    arg: Any,
    out_dir: str,
    path: list[str],
) -> None:
    """Child: join the gloo group, run fn(rank, world, arg), save {'ok', 'result' | 'error'}."""
    sys.path[:0] = [p for p in path if p not in sys.path]
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(threads)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        torch.save({"ok": True, "result": fn(rank, world, arg)}, out)
    except BaseException as e:
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}"}, out)
        raise
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def spawn_ranks(
    fn: Callable[[int, int, Any], Any],
    world: int,
    arg: Any,
    tmp: Path,
    *,
    timeout_s: float = 30.0,
    deadline_s: float = 300.0,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """fn(rank, world, arg) on `world` spawned ranks; each rank's record: {'ok', 'result' | 'error'}
    (a rank that died without one reads {'ok': False, 'error': 'none'})."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(r, world, port, timeout_s, threads, fn, arg, str(tmp), list(sys.path)),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.1, end - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    assert not hung, f"{len(hung)} rank(s) still running after {deadline_s}s"
    records = []
    for r in range(world):
        f = tmp / f"rank{r}.pt"
        records.append(
            torch.load(f, weights_only=False) if f.exists() else {"ok": False, "error": "none"}
        )
    return records


def run_ranks(
    fn: Callable[[int, int, Any], Any], world: int, arg: Any, tmp: Path, **kw: Any
) -> list[Any]:
    """spawn_ranks, asserting every rank succeeded; each rank's result."""
    records = spawn_ranks(fn, world, arg, tmp, **kw)
    for r, rec in enumerate(records):
        assert rec["ok"], f"rank {r}: {rec['error']}"
    return [rec["result"] for rec in records]
