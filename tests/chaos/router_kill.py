"""Router kills under streams: the cluster outlives its routers, and no stream is ever wrong.

    python tests/chaos/router_kill.py --seed 1 --kills 10

A Ray cluster owned by this script runs one batonserve cluster (demo model, float32, 1 prefill +
1 decode worker). Two routers are attached: a victim, killed with SIGKILL at a seeded random
moment under concurrent streams of seeded lengths and started again each round, and a survivor
serving its own streams meanwhile. Per stream: the offline engine's tokens (the greedy tokens of
a shorter stream are a prefix of the longest one), or, on the victim only, UNAVAILABLE after a
prefix of them. Per round: the restarted router attaches without recreating a worker actor, and
every block pool is back to its baseline (the dead router's requests aborted by the read lease).
Prints `router kills: N, streams checked: M, failures: F`; exit status 1 if F > 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from batonserve.cluster.env import keep_ray_on_loopback

keep_ray_on_loopback()  # before Ray is imported: it reads the setting at import time
TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))  # tests/: the testkit package

import grpc  # noqa: E402
from testkit.router_attach import (  # noqa: E402
    NAMESPACE,
    PROMPTS,
    config,
    expected_tokens,
    owned_ray,
    router_port,
    start_router,
    stream,
    wait_baseline,
    worker_ids,
)
from testkit.serve_process import Server, cli  # noqa: E402


def check(i: int, out: list[int] | grpc.StatusCode, want: list[int], victim: bool) -> str:
    """'' when the stream is right, else what is wrong with it."""
    if isinstance(out, list):
        return "" if out == want else f"stream {i}: tokens {out} != {want}"
    if victim and out == grpc.StatusCode.UNAVAILABLE:
        return ""
    return f"stream {i} ({'victim' if victim else 'survivor'}) ended {out}"


async def one_round(
    rng: random.Random,
    victim_port: int,
    survivor_port: int,
    victim: Server,
    expected: list[list[int]],
) -> tuple[int, list[str], int]:
    """Streams on both routers, the victim killed meanwhile: (streams, failures, cut streams)."""
    jobs = []
    seen: list[list[int]] = []  # the victim's streams' tokens so far
    for port, is_victim in ((victim_port, True), (survivor_port, False)):
        for _ in range(rng.randint(2, 4)):
            p = rng.randrange(len(PROMPTS))
            n = rng.randint(4, 48)
            got: list[int] = []
            if is_victim:
                seen.append(got)
            job = asyncio.ensure_future(stream(port, PROMPTS[p], got, n))
            jobs.append((p, n, is_victim, job))
    # A seeded moment once the victim streams: most kills land mid-stream, some between.
    deadline = time.monotonic() + 60
    while not any(seen) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(rng.uniform(0.0, 0.8))
    victim.proc.send_signal(signal.SIGKILL)
    outs = await asyncio.wait_for(asyncio.gather(*(j[3] for j in jobs)), 120)
    failures, cut = [], 0
    for k, ((p, n, is_victim, _), out) in enumerate(zip(jobs, outs, strict=True)):
        cut += not isinstance(out, list)
        if why := check(k, out, expected[p][:n], is_victim):
            failures.append(why)
    return len(jobs), failures, cut


def main() -> int:
    """Run the loop; 0 when every stream checked out."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kills", type=int, default=10)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    expected = expected_tokens()
    streams = failures = cuts = 0
    attach: list[float] = []
    with owned_ray() as address, tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp))
        t0 = time.monotonic()
        victim = start_router(cfg, address)
        router_port(victim)
        cold = time.monotonic() - t0  # starts the cluster: loads every worker's weights
        survivor = start_router(cfg, address)
        survivor_port = router_port(survivor)
        workers = worker_ids()
        kills = 0
        try:
            for k in range(args.kills):
                kills = k + 1
                vport = router_port(victim)
                n, bad, cut = asyncio.run(one_round(rng, vport, survivor_port, victim, expected))
                victim.proc.wait(30)
                streams, failures, cuts = streams + n, failures + len(bad), cuts + cut
                for why in bad:
                    print(f"kill {k + 1}: FAILURE {why}", flush=True)
                t0 = time.monotonic()
                victim = start_router(cfg, address)
                router_port(victim, timeout=120)
                attach.append(time.monotonic() - t0)
                if worker_ids() != workers:
                    failures += 1
                    print(f"kill {k + 1}: FAILURE worker actors were recreated", flush=True)
                wait_baseline()
                print(
                    f"kill {k + 1}: {n} streams ({cut} cut), reattached in {attach[-1]:.1f}s",
                    flush=True,
                )
        except Exception as e:  # the loop cannot go on (e.g. Ray's memory monitor killed it)
            failures += 1
            print(f"kill {kills}: FAILURE the loop stopped: {type(e).__name__}: {e}"[:2000])
        finally:
            victim.stop()
            survivor.stop()
            cli("stop", "--ray-address", address, "--namespace", NAMESPACE, timeout=180)
    print(
        f"router kills: {kills}, streams checked: {streams}, failures: {failures} "
        f"({cuts} cut by a kill; reattach {min(attach, default=0):.1f}-"
        f"{max(attach, default=0):.1f}s, "
        f"first start {cold:.1f}s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
