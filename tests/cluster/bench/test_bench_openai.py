"""`batonserve bench --protocol openai`, and the same load over gRPC and HTTP side by side."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from testkit.router_harness import RouterHarness

from batonserve.cluster.bench.drivers import Connection
from batonserve.cluster.bench.openai_driver import base_url
from batonserve.cluster.bench.runner import BenchConfig, run_bench
from batonserve.cluster.bench.workload import LengthSpec, synthetic_requests
from batonserve.cluster.cli import main
from batonserve.cluster.config import RouterConfig
from batonserve.cluster.router.openai_server import OpenAIServer
from batonserve.workers.tokenizer import Tokenizer

Make = Callable[..., RouterHarness]


@pytest.fixture
def served(bench_router: Make, bench_tokenizer: Tokenizer) -> Iterator[tuple[RouterHarness, str]]:
    """A router over the fake cluster with its OpenAI API on a free port: (harness, host:port)."""
    h = bench_router()
    cfg = replace(RouterConfig(), host="127.0.0.1", http_port=0)
    http = OpenAIServer(cfg, h.server.dispatcher, bench_tokenizer, None)
    port = h.loop.run(http.start())
    try:
        yield h, f"127.0.0.1:{port}"
    finally:
        h.loop.run(http.stop())


def test_openai_driver_counts_every_token(served: tuple[RouterHarness, str]) -> None:
    h, http = served
    reqs = synthetic_requests(10, LengthSpec(4, 10), LengthSpec(5, 5), None, seed=3)
    cfg = BenchConfig(
        Connection(http, timeout_s=20), "openai", concurrency=3, progress_interval_s=0
    )
    results, _ = asyncio.run(run_bench(cfg, reqs))
    assert all(r.ok for r in results), [r.code for r in results]
    assert all(r.output_tokens == 5 and len(r.tbt_s) == 4 for r in results)
    assert all(r.ttft_s is not None and r.ttft_s > 0 for r in results)
    sent = sorted(len(r.prompt_token_ids) for r in h.cluster.requests)
    assert sent == sorted(r.prompt_tokens for r in reqs)  # token-id prompts, exact lengths
    assert all(r.sampling.ignore_eos and r.sampling.max_tokens == 5 for r in h.cluster.requests)


def test_refusals_map_to_grpc_codes(served: tuple[RouterHarness, str]) -> None:
    h, http = served
    h.cluster.config.max_running = 0
    reqs = synthetic_requests(2, LengthSpec(4, 4), LengthSpec(3, 3), None, seed=4)
    cfg = BenchConfig(
        Connection(http, timeout_s=20), "openai", concurrency=1, progress_interval_s=0
    )
    results, _ = asyncio.run(run_bench(cfg, reqs))
    assert [r.code for r in results] == ["RESOURCE_EXHAUSTED"] * 2


def test_cli_runs_the_same_load_over_grpc_and_http(
    served: tuple[RouterHarness, str], tmp_path: Path
) -> None:
    h, http = served
    out = tmp_path / "bench.json"
    argv = ["bench", "--target", h.target, "--http-target", http, "--protocol", "native,openai"]
    argv += ["--concurrency", "2", "--num-requests", "6", "--prompt-len", "4:8"]
    argv += ["--output-len", "4", "--json", str(out), "--progress-interval", "0"]
    assert main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["native concurrency=2", "openai concurrency=2"]
    for run in runs:
        assert run["completed"] == 6 and run["errors"] == {}
        assert [p["output_tokens"] for p in run["per_request"]] == [4] * 6
    native, openai = ([p["prompt_tokens"] for p in r["per_request"]] for r in runs)
    assert native == openai  # the very same load


def test_base_url_and_bad_protocol() -> None:
    assert base_url(Connection("127.0.0.1:8000")) == "http://127.0.0.1:8000"
    assert base_url(Connection("h:1", ca_file="ca.pem")) == "https://h:1"
    assert base_url(Connection("http://h:2/v1")) == "http://h:2"
    assert main(["bench", "--protocol", "native,grpc", "--num-requests", "1"]) == 2
