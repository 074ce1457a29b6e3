"""`batonserve bench`: load a running server over gRPC and report latency, throughput, goodput."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc

from batonserve.cluster.bench.drivers import Connection, RequestResult
from batonserve.cluster.bench.plots import write_plots
from batonserve.cluster.bench.report import SLO, BenchReport, format_report, summarize
from batonserve.cluster.bench.runner import PROTOCOLS, BenchConfig, run_bench
from batonserve.cluster.bench.workload import (
    BenchRequest,
    LengthSpec,
    synthetic_requests,
    trace_requests,
)
from batonserve.cluster.client import add_connection_args, rpc_failure


def register(subparsers: Any) -> None:
    """Add the `bench` subcommand."""
    p = subparsers.add_parser(
        "bench",
        help="load generator: Poisson rate(s), closed-loop concurrency or an Azure trace replay",
    )
    add_connection_args(p)
    p.add_argument(
        "--protocol",
        default="native",
        help="native, kserve or openai; a comma list (native,openai) runs the same load over each",
    )
    p.add_argument(
        "--http-target",
        default="127.0.0.1:8000",
        help="the OpenAI-compatible API's HOST:PORT (or URL), for --protocol openai",
    )
    how = p.add_argument_group("arrivals (default: closed loop, concurrency 1)")
    how.add_argument(
        "--rate", help="open loop: Poisson arrivals, req/s; a comma list sweeps (1,2,4)"
    )
    how.add_argument("--concurrency", type=int, default=0, help="closed loop: N requests at once")
    how.add_argument(
        "--trace",
        help="Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens), or 'code' for the bundled "
        "one: its lengths, and its timing unless --rate/--concurrency is given",
    )
    how.add_argument("--time-scale", type=float, default=1.0, help="trace gaps x F (0.5: 2x)")
    how.add_argument("--length-scale", type=float, default=1.0, help="trace lengths x F")
    p.add_argument("--prompt-len", default="64", help="prompt tokens: N or LO:HI (uniform)")
    p.add_argument("--output-len", default="32", help="output tokens: N or LO:HI (uniform)")
    p.add_argument("--num-requests", type=int, default=100, help="requests per run (cap)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per run (cap on starts)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    p.add_argument("--slo-ttft-ms", type=float, default=0.0, help="goodput target (0: none)")
    p.add_argument("--slo-tbt-ms", type=float, default=0.0, help="mean gap per request (0: none)")
    p.add_argument("--slo-e2e-ms", type=float, default=0.0, help="goodput target (0: none)")
    p.add_argument("--json", metavar="FILE", help="write reports and per-request timings")
    p.add_argument("--plot", metavar="DIR", help="write latency_cdf.png (+ throughput_vs_rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="", help="KServe model name (default: the server's)")
    p.add_argument("--context-length", type=int, default=0, help="KServe: when not queryable")
    p.add_argument("--progress-interval", type=float, default=2.0, help="seconds; 0: quiet")
    p.set_defaults(func=run)


def parse_protocols(text: str) -> list[str]:
    """'native,openai' -> ['native', 'openai'] (each known, none twice)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in PROTOCOLS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(
            f"--protocol: a comma list of {', '.join(PROTOCOLS)} (each once), got {text!r}"
        )
    return names


def parse_rates(text: str | None) -> list[float | None]:
    """'1,2,4' -> [1.0, 2.0, 4.0]; None -> [None] (no open loop)."""
    if text is None:
        return [None]
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--rate: expected req/s numbers separated by commas, got {text!r}"
        ) from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--rate: every rate must be > 0, got {text!r}")
    return list(rates)


def workload(args: argparse.Namespace, rate: float | None) -> list[BenchRequest]:
    """The requests of one run."""
    if args.num_requests < 1:
        raise ValueError(f"--num-requests: must be >= 1, got {args.num_requests}")
    if args.trace:
        return trace_requests(
            args.trace, args.num_requests, args.time_scale, args.length_scale, rate, args.seed
        )
    prompt = LengthSpec.parse(args.prompt_len, "--prompt-len")
    output = LengthSpec.parse(args.output_len, "--output-len")
    return synthetic_requests(args.num_requests, prompt, output, rate, args.seed)


async def _run_all(
    configs: list[tuple[str, float | None, BenchConfig, list[BenchRequest]]],
    slo: SLO,
    args: argparse.Namespace,
) -> list[tuple[BenchReport, list[RequestResult]]]:
    runs = []
    for label, rate, cfg, requests in configs:
        where = cfg.connection.target
        print(f"bench: {label} against {where} ({cfg.protocol})", file=sys.stderr)
        results, wall = await run_bench(cfg, requests)
        rep = summarize(results, wall, slo, label, rate)
        print(format_report(rep), flush=True)
        runs.append((rep, results))
    return runs


def run(args: argparse.Namespace) -> int:
    """Run one bench per rate (or one closed-loop / trace run) and report."""
    rates = parse_rates(args.rate)
    if args.concurrency and args.rate:
        raise ValueError("--rate and --concurrency: choose open loop or closed loop, not both")
    concurrency = args.concurrency or (0 if args.rate or args.trace else 1)
    slo = SLO(args.slo_ttft_ms / 1000, args.slo_tbt_ms / 1000, args.slo_e2e_ms / 1000)
    protocols = parse_protocols(args.protocol)
    configs = []
    for rate in rates:
        label = (
            f"rate={rate:g}/s"
            if rate
            else (f"concurrency={concurrency}" if concurrency else "trace replay")
        )
        requests = workload(args, rate)  # user errors before any call
        for protocol in protocols:  # the very same requests over each protocol, side by side
            target = args.http_target if protocol == "openai" else args.target
            cfg = BenchConfig(
                connection=Connection(target, args.ca_file, args.token_file, args.timeout),
                protocol=protocol,  # type: ignore[arg-type]
                concurrency=concurrency,
                duration_s=args.duration,
                seed=args.seed,
                progress_interval_s=args.progress_interval,
                model=args.model,
                context_length=args.context_length,
            )
            name = f"{protocol} {label}" if len(protocols) > 1 else label
            configs.append((name, rate, cfg, requests))
    try:
        # One event loop for every run: grpc.aio does not survive a second asyncio.run.
        runs = asyncio.run(_run_all(configs, slo, args))
    except grpc.RpcError as e:  # the server refused a set-up call (auth, TLS, down)
        return rpc_failure(e, args.target)
    if args.json:
        doc = {"target": args.target, "protocol": args.protocol, "runs": []}
        doc["runs"] = [rep.to_json(results) for rep, results in runs]
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False))
    if args.plot:
        for path in write_plots(runs, args.plot):
            print(f"bench: wrote {path}", file=sys.stderr)
    return 0 if all(rep.completed for rep, _ in runs) else 1
