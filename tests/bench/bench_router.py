"""Router overhead per token: the same requests streamed through the router (gRPC, another
process) and taken from the same fake cluster API in-process, in one run.

    python tests/bench/bench_router.py [--requests 40] [--tokens 256]

The fake cluster emits tokens as fast as it can, so the difference is the router's cost
(validation, tokenization, protobuf, gRPC over loopback, the client's parsing).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the testkit package

from testkit import TESTS
from testkit.router_harness import REPLY, fakes, reply_script, write_tiny_model

from batonserve.cluster.api import GenerateRequest, ModelInfo
from batonserve.proto import generation_pb2 as pb
from batonserve.proto import generation_pb2_grpc
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.tokenizer import Tokenizer

CONTEXT = 4096


def in_process(tok: Tokenizer, repeat: int, n: int, tokens: int) -> list[float]:
    """Seconds per token of each request, consuming FakeCluster.generate directly."""
    info = ModelInfo("tiny", "LlamaForCausalLM", CONTEXT, tok.vocab_size, False)
    cluster = fakes.FakeCluster(
        info, tok, reply_script(tok, repeat), fakes.FakeClusterConfig(num_blocks=1 << 16)
    )
    prompt = tuple(tok.encode("Hello there"))

    async def run() -> list[float]:
        out = []
        for i in range(n):
            req = GenerateRequest(f"r{i}", prompt, SamplingParams(max_tokens=tokens))
            t0, count = time.perf_counter(), 0
            async for delta in cluster.generate(req):
                count += len(delta.token_ids)
            out.append((time.perf_counter() - t0) / count)
        return out

    return asyncio.run(run())


def through_router(model_dir: Path, repeat: int, n: int, tokens: int) -> list[float]:
    """Seconds per token of each request streamed from a router in a subprocess."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testkit.fake_server",
            str(model_dir),
            "5",
            "0",
            str(CONTEXT),
            str(repeat),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=TESTS,
    )
    try:
        assert proc.stdout is not None
        target = ""
        for line in proc.stdout:
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            if m:
                target = m.group(1)
                break
        assert target, "router did not start"
        with grpc.insecure_channel(target) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            req = pb.GenerateRequest(
                text="Hello there", sampling=pb.SamplingParams(max_tokens=tokens)
            )
            list(stub.Generate(req, timeout=60))  # warm-up: connection, first-call paths
            out = []
            for _ in range(n):
                t0, count = time.perf_counter(), 0
                for msg in stub.Generate(req, timeout=60):
                    count += len(msg.token_ids)
                out.append((time.perf_counter() - t0) / count)
            return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def main() -> None:
    """Print median per-token times and the router's overhead."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "tiny")
        tok = Tokenizer(model_dir / "tokenizer.json")
        repeat = args.tokens // len(tok.encode(REPLY, add_special_tokens=False)) + 1
        direct = in_process(tok, repeat, args.requests, args.tokens)
        routed = through_router(model_dir, repeat, args.requests, args.tokens)
    md, mr = statistics.median(direct), statistics.median(routed)
    print(f"requests={args.requests} tokens/request={args.tokens} (one token per message)")
    print(f"in-process ClusterAPI : median {md * 1e6:8.1f} us/token")
    print(
        f"through the router    : median {mr * 1e6:8.1f} us/token "
        f"(p90 {statistics.quantiles(routed, n=10)[-1] * 1e6:.1f})"
    )
    print(f"router overhead       : median {(mr - md) * 1e6:8.1f} us/token (target < 1000)")


if __name__ == "__main__":
    main()
