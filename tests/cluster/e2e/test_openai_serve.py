"""The OpenAI API of `batonserve serve` on the demo model, called with the unmodified `openai` client.

One `batonserve serve` subprocess for the module (local Ray on 127.0.0.1, one prefill and one
decode worker, every prompt disaggregated so the first token crosses the KV handoff), its gRPC
API beside it for parity, and the offline engine for logprobs.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.request
from collections.abc import Iterator

import grpc
import openai
import pytest
from testkit.serve_process import Server, serve_config

from batonserve.proto import generation_pb2 as pb
from batonserve.proto import generation_pb2_grpc
from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams

pytestmark = pytest.mark.cluster

PROMPT = "def main("


class Served(Server):
    """`batonserve serve` in a subprocess with its three endpoints."""

    grpc_target = ""
    http_url = ""
    metrics_url = ""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    disaggregated = "scheduler:\n  in_place_max_tokens: 0\n"  # the first token crosses the handoff
    cfg = serve_config(tmp_path_factory.mktemp("openai"), disaggregated)
    s = Served(["--config", cfg])
    try:
        s.wait_for(r"batonserve: ready", timeout=240)
        s.grpc_target = s.wait_for(r"router listening on (127\.0\.0\.1:\d+)", 5).group(1)
        s.http_url = s.wait_for(r"OpenAI API on (http://127\.0\.0\.1:\d+/v1)", 5).group(1)
        s.metrics_url = s.wait_for(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", 5).group(1)
        yield s
    finally:
        s.stop(60)


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.http_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(served: Served) -> Iterator[generation_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(served.grpc_target) as ch:
        yield generation_pb2_grpc.GenerationStub(ch)


def _grpc(
    stub: generation_pb2_grpc.GenerationStub, **sampling: object
) -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(**sampling))
    return list(stub.Generate(req, timeout=120))


def test_greedy_text_equals_grpc(
    client: openai.OpenAI, stub: generation_pb2_grpc.GenerationStub
) -> None:
    want = "".join(r.text for r in _grpc(stub, max_tokens=12, temperature=0.0))
    whole = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == want and want
    chunks = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_chat_whole_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "write a function"}]
    whole = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.choices[0].message.content and whole.usage is not None
    assert whole.usage.completion_tokens == 10 or whole.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_logprobs_equal_the_engine(
    client: openai.OpenAI, stub: generation_pb2_grpc.GenerationStub
) -> None:
    engine = Engine.from_model("demo")
    want = engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))[0]
    assert len(want.logprobs) == len(want.token_ids) == 6

    got = [lp for r in _grpc(stub, max_tokens=6, temperature=0.0, logprobs=3) for lp in r.logprobs]
    assert [lp.token_id for lp in got] == want.token_ids
    for g, w in zip(got, want.logprobs, strict=True):
        assert w is not None and math.isclose(g.logprob, w.logprob, abs_tol=1e-3)
        assert [t.token_id for t in g.top] == [t for t, _ in w.top]
        for t, (_, v) in zip(g.top, w.top, strict=True):
            assert math.isclose(t.logprob, v, abs_tol=1e-3)

    out = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    lps = out.choices[0].logprobs
    assert lps is not None and lps.token_logprobs is not None and lps.top_logprobs is not None
    for value, w in zip(lps.token_logprobs, want.logprobs, strict=True):
        assert w is not None and math.isclose(value, w.logprob, abs_tol=1e-3)
    assert all(len(top) >= 3 for top in lps.top_logprobs)

    chat = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    entries = [
        e
        for c in chat
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert len(entries) == 4
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert bytes(e.bytes or []).decode(errors="replace") == e.token or e.bytes


def test_n_choices_with_a_seed_repeat(client: openai.OpenAI) -> None:
    def texts() -> list[str]:
        out = client.completions.create(
            model="demo", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=2
        )
        assert [c.index for c in out.choices] == [0, 1]
        return [c.text for c in out.choices]

    first = texts()
    assert texts() == first


def _scrape(served: Served) -> dict[str, float]:
    """Each sample summed over its label sets, by sample name."""
    text = urllib.request.urlopen(served.metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_vllm_series_under_real_load(served: Served, client: openai.OpenAI) -> None:
    # Its own load (at least 8 requests), not what the module's earlier tests happened to send.
    for seed in range(4):
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=4, n=2, seed=seed)
    s = _scrape(served)
    done = s["batonserve_request_queue_time_seconds_count"]
    assert done >= 8 and s["batonserve_request_prefill_time_seconds_count"] == done
    # The queue ends when a worker schedules the request, well before its first token.
    assert (
        s["batonserve_request_queue_time_seconds_sum"]
        < (s["batonserve_time_to_first_token_seconds_sum"])
    )
    assert s["batonserve_iteration_tokens_total_count"] > 0
    assert s["batonserve_cache_config_info"] == 2  # one per worker
    assert s["batonserve_request_success_total"] >= done - 1
    assert s["batonserve_request_params_n_sum"] >= 2
    assert s["batonserve_request_time_per_output_token_seconds_count"] > 0


def test_client_disconnect_frees_the_request(
    served: Served, stub: generation_pb2_grpc.GenerationStub
) -> None:
    def load() -> list[tuple[int, int, float]]:
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        return [(w.running_requests, w.waiting_requests, w.kv_cache_usage) for w in info.workers]

    baseline = load()
    assert all(r == w == 0 for r, w, _ in baseline)

    def cancelled() -> float:
        text = urllib.request.urlopen(served.metrics_url, timeout=10).read().decode()
        rows = [ln for ln in text.splitlines() if ln.startswith("batonserve_requests_total{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in rows if 'code="CANCELLED"' in ln)

    before = cancelled()
    body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    host, port = served.http_url.removeprefix("http://").removesuffix("/v1").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    conn.close()  # gone mid-stream, long before the end
    deadline = time.monotonic() + 30
    while load() != baseline or cancelled() != before + 1:
        assert time.monotonic() < deadline, f"not back to baseline: {load()} vs {baseline}"
        time.sleep(0.2)
