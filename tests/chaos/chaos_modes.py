"""Chaos in the other documented modes: ring (sequence-parallel) prefill, expert parallelism
and tensor parallelism.

    python tests/chaos/chaos_modes.py --mode ring --seed 1 --runs 10   # a local Ray on 127.0.0.1
    python tests/chaos/chaos_modes.py --mode ep --seed 1 --runs 10
    python tests/chaos/chaos_modes.py --mode tp --seed 1 --runs 10 --streams 16

Both run real models in float32 (where a resume is exact): `ring` a tiny random Llama with three
prefill workers joined in a ring group and one decode worker, long prompts prefilled by the
ring; `ep` the bundled demo-moe with expert_parallel_size 2 (each worker leads a group with one
follower actor), one prefill and one decode worker. Each run streams a few greedy and seeded
sampled requests while a seeded schedule kills: a random ring member at a random moment
(`ring_member`), a member of the ring a job was just sent to, during its ring prefill
(`ring_job`), a random EP follower (`ep_follower`), or one rank (not rank 0) of a tensor-parallel
worker (`tp_rank`; `tp`: the bundled demo, prefill and decode workers of tensor_parallel_size 2). After each run, per stream: the offline
engine's tokens, or a clear status; then every pool back to its baseline, no handoff open, and
the ring group whole again (no EP follower left without its leader).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from batonserve.cluster.api import AdmissionRejected, ClusterUnavailable, GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.sp_serving.config import SequenceParallelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the testkit package
from chaos import RUN_S, START_S, Report, settle
from testkit.hf_tiny import make_tiny_model
from testkit.ray_local import two_node_ray

PAIR_ONLY = SchedulerConfig(  # ring members and EP groups serve prefill; no role flips here
    conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
)
KINDS = {"ring": ("ring_member", "ring_job"), "ep": ("ep_follower",), "tp": ("tp_rank",)}


@dataclasses.dataclass
class Mode:
    """One mode's cluster, its prompts and its offline reference."""

    config: ServeConfig
    reference: Engine
    prompt: Callable[[random.Random], list[int]]
    max_tokens: int
    whole: Callable[[Cluster], bool]  # the ring / every EP group is complete again


def ring_mode(address: str, namespace: str, folder: Path) -> Mode:
    """Three ring members + one decode worker; prompts of 48+ tokens take the ring."""
    model = str(make_tiny_model("llama", folder / "tiny-llama"))
    engine = EngineConfig(
        dtype="float32", device="cpu", block_size=4, num_kv_blocks=1024, max_num_batched_tokens=32
    )
    sp = SequenceParallelConfig(
        enabled=True, threshold_tokens=48, tokens_per_rank=32, max_group_size=3, timeout_s=4.0
    )
    cfg = ServeConfig(
        model=model,
        ray=_ray(address, namespace),
        engine=engine,
        pools=(
            PoolConfig("prefill", "prefill", 3, num_cpus=0.25, resources=_on(address, "prefill")),
            PoolConfig("decode", "decode", 1, num_cpus=0.25, resources=_on(address, "decode")),
        ),
        scheduler=PAIR_ONLY,
        sequence_parallel=sp,
    )

    def prompt(rng: random.Random) -> list[int]:
        n = rng.choice((12, 30, 60, 90, 130))  # three of five take the ring
        return [rng.randrange(3, 300) for _ in range(n)]

    def whole(cluster: Cluster) -> bool:
        ring = cluster.controller.ring
        return ring is not None and ring.available() == len(ring.members)

    return Mode(cfg, Engine(model, engine), prompt, 12, whole)


def _ray(address: str, namespace: str) -> RayConfig:
    """The Ray section of both modes: this harness's cluster, a bounded worker start."""
    return RayConfig(
        address=address,
        namespace=namespace,
        include_dashboard=False,
        worker_start_timeout_s=START_S,
    )


def ep_mode(address: str, namespace: str) -> Mode:
    """demo-moe, expert_parallel_size 2: one prefill and one decode worker, a follower each."""
    engine = EngineConfig(
        dtype="float32",
        device="cpu",
        block_size=4,
        num_kv_blocks=128,
        max_num_batched_tokens=64,
        expert_parallel_size=2,
    )
    cfg = ServeConfig(
        model="demo-moe",
        ray=_ray(address, namespace),
        engine=engine,
        pools=(
            PoolConfig("prefill", "prefill", 1, num_cpus=0.5, resources=_on(address, "prefill")),
            PoolConfig("decode", "decode", 1, num_cpus=0.5, resources=_on(address, "decode")),
        ),
        scheduler=PAIR_ONLY,
    )

    def prompt(rng: random.Random) -> list[int]:
        return [rng.randrange(3, 300) for _ in range(rng.choice((5, 12, 30)))]

    def whole(cluster: Cluster) -> bool:
        # No follower outlives its leader. A follower that dies while its group is idle is only
        # noticed at the group's next forward (which fails; its requests resume elsewhere), so
        # a group may stay one follower short until then.
        return len(followers(namespace)) <= len(cluster.controller.workers)

    ref = Engine("demo-moe", dataclasses.replace(engine, expert_parallel_size=1))
    return Mode(cfg, ref, prompt, 8, whole)


def tp_mode(address: str, namespace: str) -> Mode:
    """The demo model, one prefill and one decode worker of tensor_parallel_size 2 (gloo)."""
    engine = EngineConfig(
        dtype="float32", device="cpu", block_size=4, num_kv_blocks=128, max_num_batched_tokens=64
    )
    pools = tuple(
        PoolConfig(
            role, role, 1, num_cpus=0.5, resources=_on(address, role), tensor_parallel_size=2
        )
        for role in ("prefill", "decode")
    )
    cfg = ServeConfig(
        model="demo", ray=_ray(address, namespace), engine=engine, pools=pools, scheduler=PAIR_ONLY
    )

    def prompt(rng: random.Random) -> list[int]:
        return [rng.randrange(3, 300) for _ in range(rng.choice((5, 12, 30)))]

    def whole(cluster: Cluster) -> bool:
        # The killed rank is a decode rank (busy under the streams): its group must have been
        # replaced, follower included, so every worker has its one follower again.
        ranks = {n.split("-tp")[0] for n in followers(namespace, "-tp")}
        return ranks == set(cluster.controller.workers) and cluster_healthy(cluster)

    return Mode(cfg, Engine("demo", engine), prompt, 8, whole)


def cluster_healthy(cluster: Cluster) -> bool:
    """Every worker is up (a replaced one is healthy once its new group is ready)."""
    return all(w.healthy for w in cluster.controller.workers.values())


def _on(address: str, pool: str) -> dict[str, float]:
    """A pool's node resource on the harness's two-node Ray (none on a plain local Ray)."""
    return {f"{pool}_node": 1} if address else {}


def followers(namespace: str, tag: str = "-ep") -> list[str]:
    """Live EP follower actors (`-tp`: TP follower ranks) of the cluster in `namespace`."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == namespace and tag in a["name"])


def params_for(rng: random.Random, max_tokens: int) -> SamplingParams:
    """Greedy or a seeded sample, half and half."""
    if rng.random() < 0.5:
        seed = rng.randrange(1 << 31)
        return SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


async def one_run(
    cluster: Cluster,
    mode: Mode,
    kinds: tuple[str, ...],
    namespace: str,
    rng: random.Random,
    run: int,
    report: Report,
    streams: int,
) -> None:
    """Streams under one fault; checks every stream, then the pools, the ledger and the groups."""
    prompts = [mode.prompt(rng) for _ in range(streams)]
    params = [params_for(rng, mode.max_tokens) for _ in prompts]
    expected = [list(o.token_ids) for o in mode.reference.generate(prompts, params)]
    kind = rng.choice(kinds)
    # Tokens streamed before the fault; a ring_job fault counts ring jobs sent instead.
    at = rng.randint(0, 1) if kind == "ring_job" else rng.randint(0, streams * mode.max_tokens // 3)
    received = jobs = 0
    fired: list[str] = []

    def kill(victim: Any, what: str) -> None:
        fired.append(what)
        report.faults[kind] += 1
        report.killed += 1
        ray.kill(victim)

    ring = cluster.controller.ring
    send = ring.submit if ring is not None else None
    if kind == "ring_job" and ring is not None and send is not None:

        def submit_then_kill(choice: Any, spec: Any) -> None:
            nonlocal jobs
            send(choice, spec)  # the job is on its way to every member: one dies in its prefill
            jobs += 1
            if not fired and jobs > at:
                kill(cluster.controller.workers[rng.choice(choice.members)].actor, "ring job")

        ring.submit = submit_then_kill  # type: ignore[method-assign]

    def inject() -> None:
        if fired or received < at or kind == "ring_job":
            return
        if kind == "ring_member" and ring is not None:
            kill(cluster.controller.workers[rng.choice(ring.members)].actor, "member")
        elif kind in ("ep_follower", "tp_rank"):
            names = followers(namespace, "-ep" if kind == "ep_follower" else "-tp")
            if kind == "tp_rank":  # a decode rank: its group is generating for the streams
                names = [n for n in names if n.startswith("decode")]
            if names:
                kill(ray.get_actor(rng.choice(names), namespace=namespace), kind)

    async def stream(i: int) -> list[int] | str:
        nonlocal received
        toks: list[int] = []
        req = GenerateRequest(f"m{run}-{i}", tuple(prompts[i]), params[i])
        try:
            async for d in cluster.generate(req):
                toks += d.token_ids
                received += len(d.token_ids)
                inject()
        except (ClusterUnavailable, AdmissionRejected) as e:
            return f"{type(e).__name__}: {e}"
        return toks

    inject()
    try:
        outs = await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(streams))), RUN_S)
    except TimeoutError:
        report.failures.append(f"run {run}: streams still open after {RUN_S:.0f} s")
        raise
    finally:
        if ring is not None and send is not None:
            ring.submit = send  # type: ignore[method-assign]
    report.runs += 1
    report.missed += not fired
    for i, out in enumerate(outs):
        report.streams += 1
        report.sampled += not params[i].greedy
        if isinstance(out, str):
            report.clear_errors += 1
            report.errors[out[:160]] += 1
        elif out != expected[i]:
            report.failures.append(f"run {run} stream {i}: got {out}, expected {expected[i]}")
    problem = await settle(cluster, timeout_s=120)
    if not problem and not await _until(lambda: mode.whole(cluster), 120):
        problem = "the ring / EP groups did not come back whole"
    if problem:
        report.failures.append(f"run {run}: {problem}")


async def _until(ok: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def chaos_mode(
    mode_name: str,
    seed: int,
    runs: int,
    address: str = "",
    streams: int = 6,
    progress: bool = False,
) -> Report:
    """`runs` seeded runs of one mode on one cluster (workers and followers replaced as they die)."""
    rng = random.Random(seed)
    report = Report()
    namespace = f"chaos-{mode_name}-{seed}"
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        if mode_name == "ring":
            mode = ring_mode(address, namespace, Path(tmp))
        elif mode_name == "tp":
            mode = tp_mode(address, namespace)
        else:
            mode = ep_mode(address, namespace)
        cluster = await start_cluster(mode.config, lambda _: None)
        try:
            problem = await settle(cluster, timeout_s=120)
            assert not problem, problem
            assert await _until(lambda: mode.whole(cluster), 120), "never whole"
            for run in range(runs):
                try:
                    await one_run(
                        cluster, mode, KINDS[mode_name], namespace, rng, run, report, streams
                    )
                except TimeoutError:
                    break  # recorded as a failure
                if progress:
                    report.print_run(run)
        finally:
            await cluster.shutdown()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the report; exit status 1 on any failure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=tuple(KINDS), required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--ray-address", default="", help="an existing Ray (default: a local one)")
    args = ap.parse_args(argv)

    def run(address: str) -> Report:
        return asyncio.run(chaos_mode(args.mode, args.seed, args.runs, address, args.streams, True))

    if args.ray_address:
        report = run(args.ray_address)
    else:
        with two_node_ray() as address:  # EP followers and ring members need room on two nodes
            report = run(address)
    for f in report.failures:
        print("FAILURE", f)
    for e, n in report.errors.most_common():
        print(f"clear status x{n}: {e}")
    print(f"{args.mode} seed {args.seed}: {report.line()}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
