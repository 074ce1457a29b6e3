"""Spawn N gloo ranks on 127.0.0.1 running one function, bounded in time (shared by the SP tests)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    timeout_s: float,
    threads: int,
    fn: Callable[[int, int, Path], Any],
    out_dir: str,
    path: list[str],
) -> None:
    """Child: join the group, run fn, write its JSON result (or the error) to out_dir/rank<r>.json."""
    sys.path[:0] = [p for p in path if p not in sys.path]
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo on the loopback interface
    torch.set_num_threads(threads)
    out = Path(out_dir) / f"rank{rank}.json"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(rank, world, Path(out_dir))
        out.write_text(json.dumps({"ok": True, "result": result}))
    except BaseException as e:
        out.write_text(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        raise
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_ranks(
    fn: Callable[[int, int, Path], Any],
    world: int,
    tmp: Path,
    *,
    timeout_s: float = 30.0,
    deadline_s: float = 240.0,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Run fn(rank, world, tmp) on `world` spawned ranks; return each rank's JSON record."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(r, world, port, timeout_s, threads, fn, str(tmp), list(sys.path)),
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
        f = tmp / f"rank{r}.json"
        records.append(json.loads(f.read_text()) if f.exists() else {"ok": False, "error": "none"})
    return records
