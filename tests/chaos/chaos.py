"""Chaos harness: seeded worker kills at random moments under concurrent streams, with invariants.

    python tests/chaos/chaos.py --seed 1 --runs 20          # a local Ray on 127.0.0.1

A live cluster of scripted workers (the real scheduler, block pool, handoff and transport; the
next token is a hash of the KV the worker holds, so wrong, stale or partial KV changes tokens)
with two prefill and two decode workers, the shipped scheduler (conditional disaggregation, the
mixed pool with thresholds scaled to the scripted load so roles do flip) serves streams of mixed
prompt lengths while a seeded schedule kills workers. After each run, per stream: the tokens
equal an undisturbed run's (none missing, none repeated) or the stream ended with a clear
status; then every block pool is back to its baseline and no handoff is left open.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray

from batonserve.cluster.api import AdmissionRejected, ClusterUnavailable, GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.metrics_inputs import PoolChange
from batonserve.cluster.observer import NullObserver
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.kv_transfer import KVTransferConfig
from batonserve.workers.kv_transfer.config import TransportName
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: shared helpers
from cluster_checks import idle
from scripted_reference import scripted_reference

# Kinds of fault: a random worker of a pool; the sending or receiving side of a handoff in
# flight; a decode worker right after a stream's first token; two workers at once.
KINDS = ("prefill", "decode", "handoff_src", "handoff_dst", "first_token", "two_at_once")
SCRIPTED = ScriptedEngineConfig(
    num_blocks=1024, block_size=4, max_num_batched_tokens=64, layer_delay_s=0.002
)
# Shipped defaults except the mixed pool's thresholds, scaled to these prompts so that decode
# workers really are borrowed into the mixed pool (and returned) while workers die.
SCHEDULER = SchedulerConfig(
    mixed_pool=MixedPoolConfig(borrow_prefill_tokens=600, return_prefill_tokens=150, cooldown_s=0.2)
)


@dataclass(frozen=True)
class Fault:
    """Kill `kind` once `after_tokens` tokens have streamed (over all streams) in this run."""

    kind: str
    after_tokens: int


@dataclass
class Report:
    """What the harness did and what it found."""

    runs: int = 0
    streams: int = 0
    killed: int = 0  # workers killed (a two-at-once fault kills two)
    role_changes: int = 0  # mixed-pool borrows and returns while the faults ran
    clear_errors: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One summary line."""
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
        return (
            f"{self.runs} runs, {sum(self.faults.values())} faults ({kinds}; {self.killed} "
            f"workers killed), {self.streams} "
            f"streams checked, {self.clear_errors} ended with a clear status, "
            f"{self.role_changes} role changes, {len(self.failures)} failures"
        )


class RoleChanges(NullObserver):
    """Counts the mixed pool's role changes into the report."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def pool_change(self, change: PoolChange) -> None:
        """One borrow or return."""
        self.report.role_changes += 1


def schedule(rng: random.Random, streams: int, max_tokens: int) -> list[Fault]:
    """One run's faults: one to three, at random moments of the run's token stream.

    Every moment is reached (each stream makes at least max_tokens // 2 tokens); a first-token
    fault is armed from the start and fires at the next stream's first token.
    """
    reach = streams * (max_tokens // 2) * 3 // 4
    faults = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(KINDS)
        faults.append(Fault(kind, 0 if kind == "first_token" else rng.randint(1, reach)))
    return sorted(faults, key=lambda f: f.after_tokens)


def prompts_for(rng: random.Random, streams: int) -> list[list[int]]:
    """Mixed lengths: short ones run in place on a decode worker, long ones are handed off."""
    lengths = [rng.choice((3, 8, 30, 120, 300, 420)) for _ in range(streams)]
    return [[rng.randrange(2, SCRIPTED.vocab_size) for _ in range(n)] for n in lengths]


def pick_victims(cluster: Cluster, kind: str, rng: random.Random) -> tuple[str, list[str]]:
    """The kind of fault really injected now and the workers it kills (healthy ones only).

    A handoff fault with no handoff in flight falls back to a random worker of that side's pool.
    """
    ws = {n: h for n, h in cluster.controller.workers.items() if h.healthy}
    by_pool = {
        p: sorted(n for n, h in ws.items() if h.spec.pool == p) for p in ("prefill", "decode")
    }
    if kind in ("handoff_src", "handoff_dst"):
        live = [h for h in cluster.ledger.live() if h.src in ws and h.dst in ws]
        if not live:
            return pick_victims(cluster, "prefill" if kind == "handoff_src" else "decode", rng)
        h = rng.choice(live)
        return kind, [h.src if kind == "handoff_src" else h.dst]
    if kind in ("prefill", "decode", "first_token"):
        pool = by_pool["prefill" if kind == "prefill" else "decode"]
        return kind, [rng.choice(pool)] if pool else []
    pre, dec = by_pool["prefill"], by_pool["decode"]
    return kind, ([rng.choice(pre)] if pre else []) + ([rng.choice(dec)] if dec else [])


async def one_run(
    cluster: Cluster, rng: random.Random, run: int, report: Report, streams: int, max_tokens: int
) -> None:
    """Streams under a fault schedule; checks every stream, then the pools and the ledger."""
    prompts = prompts_for(rng, streams)
    lengths = [rng.randint(max_tokens // 2, max_tokens) for _ in prompts]
    faults = collections.deque(schedule(rng, streams, max_tokens))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    expected = [
        scripted_reference(SCRIPTED, [p], sp)[0] for p, sp in zip(prompts, params, strict=True)
    ]
    received = 0
    first_token_armed: list[bool] = []

    def inject() -> None:
        while faults and received >= faults[0].after_tokens:
            f = faults.popleft()
            if f.kind == "first_token":
                first_token_armed.append(True)  # the next stream to get its first token
                continue
            kill(f.kind)

    def kill(kind: str) -> None:
        used, victims = pick_victims(cluster, kind, rng)
        for name in victims:
            ray.kill(cluster.controller.workers[name].actor)
        if victims:
            report.faults[used] += 1
            report.killed += len(victims)

    async def stream(i: int) -> list[int] | str:
        nonlocal received
        toks: list[int] = []
        req = GenerateRequest(f"c{run}-{i}", tuple(prompts[i]), params[i])
        try:
            async for d in cluster.generate(req):
                toks += d.token_ids
                received += len(d.token_ids)
                if len(toks) == len(d.token_ids) and d.token_ids and first_token_armed:
                    first_token_armed.pop()
                    kill("first_token")
                inject()
        except (ClusterUnavailable, AdmissionRejected) as e:
            return f"{type(e).__name__}: {e}"
        return toks

    inject()  # arms a first-token fault
    outs = await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(streams))), 300)
    report.runs += 1  # faults not reached (the run ended first) are not counted
    for i, out in enumerate(outs):
        report.streams += 1
        if isinstance(out, str):
            report.clear_errors += 1
        elif out != expected[i]:
            report.failures.append(f"run {run} stream {i}: got {out}, expected {expected[i]}")
    problem = await settle(cluster)
    if problem:
        report.failures.append(f"run {run}: {problem}")


async def settle(cluster: Cluster, timeout_s: float = 60.0) -> str:
    """Wait for every worker healthy and idle with all blocks free and no handoff; "" or why not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not cluster.requests and idle(cluster):
            return ""
        await asyncio.sleep(0.05)
    ws = list(cluster.controller.workers.values())
    live = [(h.handoff_id, h.state.value) for h in cluster.ledger.live()]
    return f"not back to baseline: handoffs {live}, stats {[w.stats for w in ws]}"


def serve_config(address: str, namespace: str, transport: TransportName) -> ServeConfig:
    """Two prefill and two decode scripted workers, the shipped scheduler (see SCHEDULER)."""
    res = {"prefill_node": 1} if address else {}
    dres = {"decode_node": 1} if address else {}
    return ServeConfig(
        model="scripted",
        ray=RayConfig(address=address, namespace=namespace, include_dashboard=False),
        pools=(
            PoolConfig("prefill", "prefill", 2, num_cpus=0.25, resources=res),
            PoolConfig("decode", "decode", 2, num_cpus=0.25, resources=dres),
        ),
        scheduler=SCHEDULER,
        kv_transfer=KVTransferConfig(transport=transport),
    )


async def chaos(
    seed: int,
    runs: int,
    address: str = "",
    namespace: str = "chaos",
    streams: int = 12,
    max_tokens: int = 24,
    transport: TransportName = "torch_dist",
) -> Report:
    """Run `runs` seeded runs on one cluster (workers are replaced as they die)."""
    rng = random.Random(seed)
    report = Report()
    cfg = serve_config(address, namespace, transport)
    observer = RoleChanges(report)
    cluster = await start_cluster(cfg, lambda _: None, scripted=SCRIPTED, observer=observer)
    try:
        problem = await settle(cluster)
        assert not problem, problem
        for run in range(runs):
            await one_run(cluster, rng, run, report, streams, max_tokens)
    finally:
        await cluster.shutdown()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the report; exit status 1 on any failure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--streams", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--transport", choices=("torch_dist", "object_store"), default="torch_dist")
    ap.add_argument("--ray-address", default="", help="an existing Ray (default: a local one)")
    args = ap.parse_args(argv)
    report = asyncio.run(
        chaos(
            args.seed,
            args.runs,
            args.ray_address,
            streams=args.streams,
            max_tokens=args.max_tokens,
            transport=args.transport,
        )
    )
    for f in report.failures:
        print("FAILURE", f)
    print(f"seed {args.seed}: {report.line()}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
