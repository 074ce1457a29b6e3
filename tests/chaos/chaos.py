"""Chaos harness: seeded worker kills at random moments under concurrent streams, with invariants.

    python tests/chaos/chaos.py --seed 1 --runs 20          # a local Ray on 127.0.0.1

A live cluster of scripted workers (the real scheduler, block pool, handoff and transport; the
next token is a hash of the KV the worker holds, so wrong, stale or partial KV changes tokens)
with two prefill and two decode workers, the shipped scheduler (conditional disaggregation, the
mixed pool with thresholds scaled to the scripted load so roles do flip: scripted prefill takes
time per prompt token, so each run's prompt burst is a backlog the mixed pool sees over several
of its ticks and borrows a decode worker for) serves streams of mixed prompt lengths, half of
them greedy and half seeded samples (temperature > 0), while a seeded schedule kills workers,
some at random moments and some at exact ones (an import commit, a role flip, a first token, a
worker lent to the mixed pool). Some streams ask for logprobs, and some are aborted by their
client after a random number of tokens. After each run, per stream: the tokens equal an
undisturbed run's (none missing, none repeated: the first token exactly once), or their prefix
for an aborted stream, or the stream ended with a clear status; a stream that asked for
logprobs got one per token, for that token, equal to the undisturbed run's; then every block
pool is back to its baseline, every worker in its home role, and no handoff is left open.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from batonserve.cluster.api import AdmissionRejected, ClusterUnavailable, GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.controller import WorkerHandle
from batonserve.cluster.metrics_inputs import PoolChange
from batonserve.cluster.observer import NullObserver
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, RoleChange, SchedulerConfig
from batonserve.workers.kv_transfer import TRANSPORTS, KVTransferConfig
from batonserve.workers.kv_transfer.config import TransportName
from batonserve.workers.outputs import TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngine, ScriptedEngineConfig
from batonserve.workers.worker_types import HandoffEvent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the testkit package
from testkit.cluster_checks import idle

# Kinds of fault: a random worker of a pool; the sending or receiving side of a handoff in
# flight; two workers at once. Armed ones are armed when the run starts and fire at their next
# exact moment: a decode worker right after a stream's first token; the decode side of a handoff
# as the cluster reads its import commit; the worker whose role the mixed pool just flipped; a
# worker while it is lent to the mixed pool. Every run meets each kind's first moment: it has
# first tokens, hands off prompts (HANDED_OFF) and borrows a decode worker for its prompt burst.
KINDS = (
    "prefill",
    "decode",
    "handoff_src",
    "handoff_dst",
    "first_token",
    "two_at_once",
    "import_commit",
    "role_flip",
    "mixed",
)
ARMED = ("first_token", "import_commit", "role_flip", "mixed")
# A worker (or its replacement) not ready by then fails, and requests waiting for it end with a
# clear status: well inside RUN_S, the most one run's streams may take before it is a failure.
START_S = 120.0
RUN_S = 300.0
SAMPLED_SHARE = 0.5  # streams with temperature > 0 and a seed (the rest greedy)
LOGPROBS_SHARE = 0.5  # streams that ask for logprobs (checked per token against the reference)
ABORT_SHARE = 0.25  # streams whose client aborts them after a random number of tokens
# Prefill at 1 ms per prompt token: a prefill worker computes about one token per ms, so a run's
# backlog (at least 300 prompt tokens per prefill worker, see prompts_for) stays above the borrow
# threshold for 200 ms or more: two of the cluster's 0.1 s housekeeping ticks, which decide role
# changes. Without it the whole backlog cleared in tens of ms, between ticks, and roles flipped
# in few runs (an armed role-flip or mixed fault then had no moment to meet).
SCRIPTED = ScriptedEngineConfig(
    num_blocks=1024,
    block_size=4,
    max_num_batched_tokens=64,
    layer_delay_s=0.002,
    prompt_token_delay_s=0.001,
)
# The reference runs unpaced: the pace changes no token.
REFERENCE = dataclasses.replace(SCRIPTED, layer_delay_s=0.0, prompt_token_delay_s=0.0)
# Shipped defaults except the mixed pool's thresholds, scaled to these prompts so that decode
# workers really are borrowed into the mixed pool (and returned) while workers die.
SCHEDULER = SchedulerConfig(
    mixed_pool=MixedPoolConfig(borrow_prefill_tokens=100, return_prefill_tokens=25, cooldown_s=0.2)
)
LENGTHS = (3, 8, 30, 120, 300, 420)  # prompt lengths drawn
HANDED_OFF = 2  # prompts per run at least too long to run in place (they load the prefill pool)


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
    role_changes: int = 0  # mixed-pool borrows and returns (those between runs too)
    clear_errors: int = 0
    missed: int = 0  # armed faults whose moment did not come before the run ended (not counted)
    armed: collections.Counter[str] = field(default_factory=collections.Counter)  # drawn, by kind
    sampled: int = 0  # streams checked that were seeded samples (temperature > 0)
    with_logprobs: int = 0  # streams checked that asked for logprobs
    aborted: int = 0  # streams their client aborted (their prefix checked)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # clear ones
    failures: list[str] = field(default_factory=list)
    printed: int = 0  # failures already printed by print_run

    def print_run(self, run: int) -> None:
        """Progress after one run: the summary line, then the failures not printed yet."""
        print(f"run {run}: {self.line()}", flush=True)
        for f in self.failures[self.printed :]:
            print("FAILURE", f, flush=True)
        self.printed = len(self.failures)

    def line(self) -> str:
        """One summary line."""
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
        return (
            f"{self.runs} runs, {sum(self.faults.values())} faults ({kinds}; {self.killed} "
            f"workers killed), {self.streams} "
            f"streams checked ({self.sampled} sampled, {self.with_logprobs} with logprobs, "
            f"{self.aborted} aborted by the client), {self.clear_errors} ended with a clear status, "
            f"{self.role_changes} role changes, {self.missed} armed faults missed their moment, "
            f"{len(self.failures)} failures"
        )


class RoleChanges(NullObserver):
    """Counts the mixed pool's role changes into the report."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def pool_change(self, change: PoolChange) -> None:
        """One borrow or return."""
        self.report.role_changes += 1


def schedule(
    rng: random.Random, streams: int, max_tokens: int, kinds: Sequence[str] = KINDS
) -> list[Fault]:
    """One run's faults: one to three, at random moments of the run's token stream.

    Every token count is reached (each stream makes at least max_tokens // 2 tokens). An armed
    fault is armed from the start and waits for its kind's next moment (see ARMED): the run's
    first ones come for sure, not a second borrow once the lent worker is killed, say.
    """
    reach = streams * (max_tokens // 2) * 3 // 4
    faults = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(kinds)
        # Drawn for the armed kinds too, though unused: the draws that follow stay as they were.
        last = reach // 2 if kind in ARMED else reach
        at = 0 if kind == "first_token" else rng.randint(1, last)
        faults.append(Fault(kind, 0 if kind in ARMED else at))
    return sorted(faults, key=lambda f: f.after_tokens)


def params_for(rng: random.Random, max_tokens: int) -> SamplingParams:
    """Greedy, or a seeded sample (its noise is keyed by seed and position: exact on resume)."""
    n = rng.randint(max_tokens // 2, max_tokens)
    if rng.random() < SAMPLED_SHARE:
        seed = rng.randrange(1 << 31)
        return SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def with_extras(
    rng: random.Random, params: list[SamplingParams]
) -> tuple[list[SamplingParams], list[int]]:
    """Logprobs asked for on some streams; per stream, the token count after which its client
    aborts it (0: never). From their own generator, so a seed's fault schedule stays the same."""
    out, aborts = [], []
    for p in params:
        if rng.random() < LOGPROBS_SHARE:
            p = dataclasses.replace(p, logprobs=rng.choice((0, 2)))
        out.append(p)
        aborts.append(rng.randint(1, p.max_tokens - 1) if rng.random() < ABORT_SHARE else 0)
    return out, aborts


Expected = tuple[list[int], list[TokenLogprobs | None]]


def reference(prompt: list[int], params: SamplingParams) -> Expected:
    """One stream's tokens and logprobs, run alone on an in-process scripted engine."""
    engine = ScriptedEngine(REFERENCE)
    engine.add_request("ref", list(prompt), params)
    toks: list[int] = []
    lps: list[TokenLogprobs | None] = []
    while engine.has_unfinished():
        for o in engine.step():
            toks += o.new_token_ids
            lps += o.logprobs
    return toks, lps


def check_stream(
    i: int, got: Expected, expected: Expected, params: SamplingParams, abort_at: int
) -> str:
    """Empty when stream i got what it should (a prefix if its client aborted it), else why not."""
    toks, lps = got
    want_toks, want_lps = expected
    if abort_at:
        want_toks, want_lps = want_toks[: len(toks)], want_lps[: len(toks)]
        if len(toks) < min(abort_at, len(expected[0])):
            return f"stream {i}: aborted after {abort_at} tokens but got only {len(toks)}"
    if toks != want_toks:
        return f"stream {i}: got {toks}, expected {want_toks}"
    if params.logprobs is None:
        return "" if not any(lps) else f"stream {i}: logprobs nobody asked for"
    if len(lps) != len(toks):
        return f"stream {i}: {len(lps)} logprobs for {len(toks)} tokens"
    if any(lp is None or lp.token_id != t for lp, t in zip(lps, toks, strict=True)):
        return f"stream {i}: logprobs {lps} do not match tokens {toks}"
    if lps != want_lps:
        return f"stream {i}: logprobs {lps}, expected {want_lps}"
    return ""


def prompts_for(rng: random.Random, streams: int) -> list[list[int]]:
    """Mixed lengths: short ones run in place on a decode worker, long ones are handed off (at
    least HANDED_OFF of them: every run loads the prefill pool)."""
    lengths = [rng.choice(LENGTHS) for _ in range(streams)]
    short = [i for i, n in enumerate(lengths) if n <= SCHEDULER.in_place_max_tokens]
    for i in short[: max(0, min(HANDED_OFF, streams) - (streams - len(short)))]:
        lengths[i] = max(LENGTHS)
    return [[rng.randrange(2, SCRIPTED.vocab_size) for _ in range(n)] for n in lengths]


def pick_victims(
    cluster: Cluster, kind: str, rng: random.Random, dead: Dead = frozenset()
) -> tuple[str, list[str]]:
    """The kind of fault really injected now and the workers it kills (healthy ones only, and
    none already killed: the cluster may not have noticed yet).

    A handoff fault with no handoff in flight falls back to a random worker of that side's pool.
    """
    ws = {n: h for n, h in cluster.controller.workers.items() if alive(h, dead)}
    by_pool = {
        p: sorted(n for n, h in ws.items() if h.spec.pool == p) for p in ("prefill", "decode")
    }
    if kind in ("handoff_src", "handoff_dst"):
        live = [h for h in cluster.ledger.live() if h.src in ws and h.dst in ws]
        if not live:
            side = "prefill" if kind == "handoff_src" else "decode"
            return pick_victims(cluster, side, rng, dead)
        h = rng.choice(live)
        return kind, [h.src if kind == "handoff_src" else h.dst]
    if kind in ("prefill", "decode", "first_token"):
        pool = by_pool["prefill" if kind == "prefill" else "decode"]
        return kind, [rng.choice(pool)] if pool else []
    if kind == "mixed":
        lent = sorted(n for n, h in ws.items() if h.role == "mixed")
        return kind, [rng.choice(lent)] if lent else []
    pre, dec = by_pool["prefill"], by_pool["decode"]
    return kind, ([rng.choice(pre)] if pre else []) + ([rng.choice(dec)] if dec else [])


Dead = frozenset[tuple[str, int]] | set[tuple[str, int]]  # (worker, incarnation) killed


def alive(h: WorkerHandle, dead: Dead) -> bool:
    """Healthy to the cluster and not killed by the harness (a replacement is a new incarnation)."""
    return h.healthy and (h.name, h.incarnation) not in dead


class Moments:
    """Calls back at exact moments of the cluster's life: the cluster reads a decode worker's
    import commit (before it acts on it), or the mixed pool flips a worker's role (just after
    the cluster applied it). Wraps two methods of one Cluster instance; no product hook."""

    def __init__(self, cluster: Cluster) -> None:
        self.on_commit: Callable[[str], None] | None = None
        self.on_role_change: Callable[[str], None] | None = None
        on_event, rebalance = cluster._on_event, cluster.cls.rebalance

        def on_event_hook(name: str, ev: HandoffEvent) -> None:
            if ev.kind == "committed" and self.on_commit is not None:
                self.on_commit(name)
            on_event(name, ev)

        def rebalance_hook(views: Any, now: float) -> list[RoleChange]:
            changes = rebalance(views, now)
            for c in changes:  # the cluster applies the change right after this returns
                if self.on_role_change is not None:
                    asyncio.get_running_loop().call_soon(self.on_role_change, c.worker_id)
            return changes

        cluster._on_event = on_event_hook  # type: ignore[method-assign]
        cluster.cls.rebalance = rebalance_hook  # type: ignore[method-assign]


async def one_run(
    cluster: Cluster,
    moments: Moments,
    rng: random.Random,
    run: int,
    report: Report,
    streams: int,
    max_tokens: int,
    kinds: Sequence[str] = KINDS,
    extras: random.Random | None = None,
    victims_rng: random.Random | None = None,
) -> None:
    """Streams under a fault schedule; checks every stream, then the pools and the ledger.

    Victims are drawn from victims_rng (default rng): apart, a seed's prompts and schedules do
    not depend on which faults met their moments in earlier runs."""
    prompts = prompts_for(rng, streams)
    params = [params_for(rng, max_tokens) for _ in prompts]
    faults = collections.deque(schedule(rng, streams, max_tokens, kinds))
    report.armed.update(f.kind for f in faults if f.kind in ARMED)
    pick = victims_rng or rng
    dead: set[tuple[str, int]] = set()
    aborts = [0] * streams
    if extras is not None:
        params, aborts = with_extras(extras, params)
    expected = [reference(p, sp) for p, sp in zip(prompts, params, strict=True)]
    received = 0
    armed: collections.Counter[str] = collections.Counter()  # exact-moment faults waiting

    def inject() -> None:
        while faults and received >= faults[0].after_tokens:
            f = faults.popleft()
            if f.kind in ARMED:
                armed[f.kind] += 1  # fires at its next moment (see moments())
                continue
            kill(f.kind)
        if armed["mixed"] and any(alive(h, dead) and h.role == "mixed" for h in workers()):
            armed["mixed"] -= 1
            kill("mixed")

    def workers() -> list[WorkerHandle]:
        return list(cluster.controller.workers.values())

    def kill(kind: str, victims: list[str] | None = None) -> None:
        if victims is None:
            kind, victims = pick_victims(cluster, kind, pick, dead)
        for name in victims:
            h = cluster.controller.workers[name]
            ray.kill(h.actor)
            dead.add((name, h.incarnation))
        if victims:
            report.faults[kind] += 1
            report.killed += len(victims)

    def on_commit(dst: str) -> None:
        if armed["import_commit"] and alive(cluster.controller.workers[dst], dead):
            armed["import_commit"] -= 1
            kill("import_commit", [dst])

    def on_role_change(worker: str) -> None:
        if armed["role_flip"] and alive(cluster.controller.workers[worker], dead):
            armed["role_flip"] -= 1
            kill("role_flip", [worker])

    moments.on_commit, moments.on_role_change = on_commit, on_role_change

    async def stream(i: int) -> Expected | str:
        nonlocal received
        toks: list[int] = []
        lps: list[TokenLogprobs | None] = []
        req = GenerateRequest(f"c{run}-{i}", tuple(prompts[i]), params[i])
        try:
            gen = cluster.generate(req)
            async for d in gen:
                toks += d.token_ids
                lps += d.logprobs
                received += len(d.token_ids)
                if len(toks) == len(d.token_ids) and d.token_ids and armed["first_token"]:
                    armed["first_token"] -= 1
                    kill("first_token")
                inject()
                if aborts[i] and len(toks) >= aborts[i]:
                    await gen.aclose()  # the client goes away: the cluster aborts the request
                    break
        except (ClusterUnavailable, AdmissionRejected) as e:
            return f"{type(e).__name__}: {e}"
        return toks, lps

    inject()  # arms the exact-moment faults
    try:
        outs = await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(streams))), RUN_S)
    except TimeoutError:
        report.failures.append(f"run {run}: streams still open after {RUN_S:.0f} s")
        raise
    finally:
        moments.on_commit = moments.on_role_change = None
    report.runs += 1  # faults not reached (the run ended first) are not counted
    report.missed += sum(armed.values()) + sum(f.kind in ARMED for f in faults)
    for i, out in enumerate(outs):
        report.streams += 1
        report.sampled += not params[i].greedy
        report.with_logprobs += params[i].logprobs is not None
        report.aborted += aborts[i] > 0
        if isinstance(out, str):
            report.clear_errors += 1
            report.errors[out[:160]] += 1
        elif problem := check_stream(i, out, expected[i], params[i], aborts[i]):
            report.failures.append(f"run {run} {problem}")
    problem = await settle(cluster)
    if problem:
        report.failures.append(f"run {run}: {problem}")


async def settle(cluster: Cluster, timeout_s: float = 60.0) -> str:
    """Wait for every worker healthy and idle with all blocks free and no handoff, and back in its
    home role (the mixed pool gives lent workers back once idle: the next run starts from the
    same pools and borrows for its own prompt burst); "" or why not."""
    deadline = time.monotonic() + timeout_s
    ws = list(cluster.controller.workers.values())
    while time.monotonic() < deadline:
        if not cluster.requests and idle(cluster) and all(w.role == w.home_role for w in ws):
            return ""
        await asyncio.sleep(0.05)
    live = [(h.handoff_id, h.state.value) for h in cluster.ledger.live()]
    roles = {w.name: w.role for w in ws}
    return f"not back to baseline: handoffs {live}, roles {roles}, stats {[w.stats for w in ws]}"


def serve_config(address: str, namespace: str, transport: TransportName) -> ServeConfig:
    """Two prefill and two decode scripted workers, the shipped scheduler (see SCHEDULER)."""
    res = {"prefill_node": 1} if address else {}
    dres = {"decode_node": 1} if address else {}
    return ServeConfig(
        model="scripted",
        ray=RayConfig(
            address=address,
            namespace=namespace,
            include_dashboard=False,
            worker_start_timeout_s=START_S,
        ),
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
    progress: bool = False,
    kinds: Sequence[str] = KINDS,
) -> Report:
    """Run `runs` seeded runs on one cluster (workers are replaced as they die)."""
    rng = random.Random(seed)
    extras = random.Random(seed + 1_000_003)  # logprobs and client aborts, apart from faults
    victims = random.Random(seed + 2_000_003)  # whom a fault kills, apart from the schedule
    report = Report()
    cfg = serve_config(address, namespace, transport)
    observer = RoleChanges(report)
    cluster = await start_cluster(cfg, lambda _: None, scripted=SCRIPTED, observer=observer)
    moments = Moments(cluster)
    try:
        problem = await settle(cluster)
        assert not problem, problem
        for run in range(runs):
            try:
                await one_run(
                    cluster, moments, rng, run, report, streams, max_tokens, kinds, extras, victims
                )
            except TimeoutError:
                break  # recorded as a failure; the cluster is in no state for another run
            if progress:
                report.print_run(run)
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
    ap.add_argument("--transport", choices=TRANSPORTS.names(), default="torch_dist")
    ap.add_argument("--ray-address", default="", help="an existing Ray (default: a local one)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS, help="faults to draw")
    args = ap.parse_args(argv)
    report = asyncio.run(
        chaos(
            args.seed,
            args.runs,
            args.ray_address,
            streams=args.streams,
            max_tokens=args.max_tokens,
            transport=args.transport,
            progress=True,
            kinds=tuple(args.kinds),
        )
    )
    for f in report.failures:
        print("FAILURE", f)
    for e, n in report.errors.most_common():
        print(f"clear status x{n}: {e}")
    print(f"seed {args.seed}: {report.line()}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
