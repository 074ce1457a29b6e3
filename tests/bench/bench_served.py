"""The served path, install against install: `batonserve bench` output tokens/s at saturation.

    git worktree add /tmp/wt-before REV     # one install per commit, in its own virtualenv
    python3 -m venv /tmp/venv-before && /tmp/venv-before/bin/pip install torch==2.13.0 \\
        -e /tmp/wt-before
    python3 tests/bench/bench_served.py --engine before=/tmp/venv-before/bin/python \\
        --engine after=/tmp/venv-after/bin/python [--concurrency 1,8,32,64] [--rounds 3]

Each `--engine NAME=PYTHON` is an install: its interpreter runs `batonserve serve` on the bundled
demo model (the default config; only the ports move: every one a free port, the dashboard's too).
Once the server says ready, a short warm-up, then one closed-loop `batonserve bench` run per
concurrency (fixed seed, prompt and output lengths, a bounded number of requests), then SIGTERM.
The bench client is always this interpreter's install, so only the served code differs. Engines
take turns, in a rotated order each round, so machine noise hits them alike; the table gives the
median output tok/s with the [min-max] spread over rounds, and each engine against the first.
Pin each side to a commit (a worktree): an editable install of a shared work tree serves whatever
is being edited there when its server starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the testkit package

from testkit.ports import free_port
from testkit.serve_process import Server, cli

CONFIG = """model: demo
router:
  port: 0
  http_port: 0
  metrics_port: 0
ray:
  dashboard_port: {dashboard}
"""


@dataclass
class Runs:
    """One engine's results: per concurrency, a (output tok/s, TTFT p50 s, errors) per round."""

    name: str
    python: str
    by_conc: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)


def parse_engine(text: str) -> tuple[str, str]:
    name, sep, python = text.partition("=")
    if not sep or not name or not python:
        raise argparse.ArgumentTypeError(f"--engine: NAME=PYTHON, got {text!r}")
    return name, python


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """The CPU as /proc/cpuinfo names it, its cores, and the bf16 matmul units (they set dtype auto)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    flags = set(next((ln for ln in info.splitlines() if ln.startswith("flags")), "").split())
    bf16 = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bf16 matmul"
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {bf16}"


def bench(target: str, conc: int, requests: int, args: argparse.Namespace) -> dict:
    """One closed-loop `batonserve bench` run; its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        limit = args.run_timeout
        try:
            r = cli(
                *("bench", "--target", target, "--concurrency", str(conc)),
                *("--num-requests", str(requests), "--seed", str(args.seed)),
                *("--prompt-len", args.prompt_len, "--output-len", args.output_len),
                *("--duration", str(limit), "--timeout", str(limit), "--progress-interval", "0"),
                *("--json", str(out)),
                timeout=limit + 60,
            )
        except subprocess.TimeoutExpired:
            raise SystemExit(
                f"bench at concurrency {conc} did not end in {limit + 60:g} s"
            ) from None
        if not out.exists():
            raise SystemExit(f"bench at concurrency {conc} failed:\n{r.stdout}\n{r.stderr}")
        return json.loads(out.read_text())["runs"][0]


def one_server(eng: Runs, concs: list[int], args: argparse.Namespace, loads: list[float]) -> None:
    """Start `eng`'s server, warm it, bench every concurrency, stop it."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(CONFIG.format(dashboard=free_port()))
        say(f"{eng.name}: starting `batonserve serve` with {eng.python}")
        server = Server(["--config", str(cfg)], python=eng.python)
        try:
            try:
                server.wait_for(r"batonserve: ready", timeout=args.ready_timeout)
                port = server.wait_for(r"router listening on [\d.]+:(\d+)", timeout=1).group(1)
            except AssertionError:
                tail = "\n".join(server.lines[-40:])
                raise SystemExit(
                    f"{eng.name}: server not ready within {args.ready_timeout:g} s; its last "
                    f"lines:\n{tail}"
                ) from None
            target = f"127.0.0.1:{port}"
            say(f"{eng.name}: ready on {target}; warm-up ({args.warmup} requests)")
            bench(target, max(concs), args.warmup, args)
            for conc in concs:
                loads.append(os.getloadavg()[0])
                # At least 8 requests per slot: the ramp-up and the last wave's drain stay small.
                rep = bench(target, conc, max(args.requests, 8 * conc), args)
                loads.append(os.getloadavg()[0])
                errors = rep["requests"] - rep["completed"]
                tok_s, ttft = rep["output_token_rate"], rep["ttft"]["p50"] or float("nan")
                eng.by_conc.setdefault(conc, []).append((tok_s, ttft, errors))
                say(
                    f"{eng.name}: concurrency {conc}: {tok_s:.0f} output tok/s, TTFT p50 "
                    f"{ttft * 1000:.0f} ms, {rep['completed']}/{rep['requests']} ok, "
                    f"{rep['wall_s']:.1f} s; load {load()}"
                )
        finally:
            say(f"{eng.name}: SIGTERM")
            try:
                code = server.stop(timeout=args.stop_timeout)
            except subprocess.TimeoutExpired:
                say(
                    f"{eng.name}: did not stop within {args.stop_timeout:g} s after SIGTERM; killed"
                )
            else:
                if code != 0:
                    say(
                        f"{eng.name}: exit code {code}; last lines:\n"
                        + "\n".join(server.lines[-20:])
                    )


def spread(xs: list[float], fmt: str) -> str:
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


def table(engines: list[Runs], concs: list[int]) -> str:
    base = engines[0]
    lines = [
        f"| engine | concurrency | output tok/s median [min-max] | TTFT p50 ms | x {base.name} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for conc in concs:
        for eng in engines:
            runs = eng.by_conc.get(conc, [])
            if not runs:
                continue
            tok = [r[0] for r in runs]
            ttft = [r[1] * 1000 for r in runs]
            ratio = statistics.median(tok) / statistics.median([r[0] for r in base.by_conc[conc]])
            errors = sum(r[2] for r in runs)
            note = f" ({errors} failed)" if errors else ""
            lines.append(
                f"| {eng.name} | {conc} | {spread(tok, '.0f')}{note} | {spread(ttft, '.0f')} | "
                f"{ratio:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--engine",
        action="append",
        type=parse_engine,
        required=True,
        help="NAME=PYTHON: an install's interpreter (repeat; the first is the base)",
    )
    # The engine's default max_num_seqs is 64: above it requests queue.
    p.add_argument("--concurrency", default="1,8,32,64", help="closed-loop concurrencies")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=48, help="per run, at least (and 8 x conc)")
    p.add_argument("--warmup", type=int, default=64, help="requests before the measured runs")
    p.add_argument("--prompt-len", default="64")
    p.add_argument("--output-len", default="64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds to say ready")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds per bench run")
    p.add_argument("--stop-timeout", type=float, default=90, help="seconds to stop on SIGTERM")
    args = p.parse_args()
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the running server is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_served: terminated"))
    concs = [int(c) for c in args.concurrency.split(",")]
    engines = [Runs(name, python) for name, python in args.engine]
    loads: list[float] = []
    say(f"machine: {machine()}; load average at start {load()}")
    for rnd in range(args.rounds):
        order = engines[rnd % len(engines) :] + engines[: rnd % len(engines)]
        say(f"round {rnd + 1}/{args.rounds}: {', '.join(e.name for e in order)}")
        for eng in order:
            one_server(eng, concs, args, loads)
    print(
        f"demo model, default config; prompt {args.prompt_len} / output {args.output_len} "
        f"tokens, max({args.requests}, 8 x concurrency) requests per run, seed {args.seed}, "
        f"{args.rounds} rounds; {machine()}"
    )
    print(table(engines, concs))
    print(
        f"load average (1 min) over the runs: {min(loads):.2f}-{max(loads):.2f}; "
        f"at the end {load()}"
    )


if __name__ == "__main__":
    main()
