"""TLS and bearer-token auth end to end: the CLI clients, both protocols, `serve` itself."""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from test_router_security import _self_signed
from testkit.router_harness import RouterHarness, fakes, reply_script, write_tiny_model

from batonserve.cluster.api import ModelInfo
from batonserve.cluster.cli import main
from batonserve.cluster.config import AuthConfig, RouterConfig, ServeConfig, TLSConfig
from batonserve.cluster.router.app import load_tokenizer, serve
from batonserve.proto import generation_pb2 as pb
from batonserve.proto import generation_pb2_grpc, kserve_v2_pb2_grpc
from batonserve.proto import kserve_v2_pb2 as kpb

TOKEN = "tok-3f9a1c"


@pytest.fixture
def secure(make_router: Callable[..., RouterHarness], tmp_path: Path) -> tuple[RouterHarness, Path]:
    """A router with TLS and a token; returns it and its certificate (the clients' CA)."""
    cert, key = _self_signed(tmp_path)
    tls = TLSConfig(cert_file=str(cert), key_file=str(key))
    return make_router(router_config=RouterConfig(tls=tls), token=TOKEN), cert


def _files(tmp_path: Path) -> tuple[Path, Path]:
    good, bad = tmp_path / "token", tmp_path / "wrong"
    good.write_text(TOKEN + "\n")
    bad.write_text("not-" + TOKEN)
    return good, bad


def test_cli_clients_over_tls_with_a_token(
    secure: tuple[RouterHarness, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h, cert = secure
    good, bad = _files(tmp_path)
    base = ["--target", h.target, "--ca-file", str(cert)]
    assert main(["generate", "Hi", "--max-tokens", "4", *base, "--token-file", str(good)]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["status", *base, "--token-file", str(good)]) == 0
    capsys.readouterr()
    bench = ["bench", *base, "--num-requests", "4", "--prompt-len", "3", "--output-len", "2"]
    assert main([*bench, "--progress-interval", "0", "--token-file", str(good)]) == 0
    assert "4/4 completed" in capsys.readouterr().out
    # A wrong token, and no token: UNAUTHENTICATED, one line, nothing reaches the cluster.
    served = len(h.cluster.requests)
    for extra in (["--token-file", str(bad)], []):
        assert main(["generate", "Hi", *base, *extra]) == 1
        err = capsys.readouterr().err
        assert "UNAUTHENTICATED" in err and "Traceback" not in err
        assert TOKEN not in err
    assert len(h.cluster.requests) == served


def test_plaintext_and_untrusted_clients_fail_cleanly(
    secure: tuple[RouterHarness, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h, cert = secure
    good, _ = _files(tmp_path)
    (tmp_path / "other").mkdir()
    other_cert, _ = _self_signed(tmp_path / "other")
    for ca in ([], ["--ca-file", str(other_cert)]):  # plaintext; TLS trusting another CA
        t0 = time.perf_counter()
        argv = ["generate", "Hi", "--target", h.target, "--token-file", str(good), *ca]
        assert main(argv) == 1
        assert time.perf_counter() - t0 < 10  # fails, never hangs
        assert "UNAVAILABLE" in capsys.readouterr().err
    assert h.cluster.requests == []
    # The server is unharmed: a proper client is served next.
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    stub = generation_pb2_grpc.GenerationStub(h.channel(creds))
    req = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=3))
    msgs = list(stub.Generate(req, timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)))
    assert sum(len(m.token_ids) for m in msgs) == 3


def test_kserve_needs_the_token_too(make_router: Callable[..., RouterHarness]) -> None:
    h = make_router(token=TOKEN)
    stub = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(h.channel())
    text = kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"Hi")
    req = kpb.ModelInferRequest(model_name="tiny", inputs=[text])
    req.parameters["max_tokens"].int64_param = 2
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", TOKEN),)):
        for call in (
            lambda md=metadata: stub.ModelInfer(req, timeout=5, metadata=md),
            lambda md=metadata: list(stub.ModelStreamInfer(iter([req]), timeout=5, metadata=md)),
            lambda md=metadata: stub.ServerReady(kpb.ServerReadyRequest(), timeout=5, metadata=md),
            lambda md=metadata: stub.ModelMetadata(
                kpb.ModelMetadataRequest(name="tiny"), timeout=5, metadata=md
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert h.cluster.requests == []
    md = (("authorization", f"Bearer {TOKEN}"),)
    assert stub.ModelInfer(req, timeout=5, metadata=md).outputs[0].name == "text_output"


@pytest.mark.parametrize("source", ["file", "env"])
def test_serve_takes_the_token_from_a_file_or_env_and_never_prints_it(
    tmp_path: Path, source: str
) -> None:
    model_dir = write_tiny_model(tmp_path / "model")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    auth = (
        AuthConfig(token_file=str(token_file))
        if source == "file"
        else AuthConfig(token_env="BATONSERVE_TEST_TOKEN")
    )
    environ = {"BATONSERVE_TEST_TOKEN": TOKEN} if source == "env" else {}
    config = ServeConfig(
        model=str(model_dir),
        router=RouterConfig(
            host="127.0.0.1", port=0, http_port=0, metrics_port=0, grace_period_s=1, auth=auth
        ),
    )
    tokenizer = load_tokenizer(str(model_dir))
    info = ModelInfo("tiny", "LlamaForCausalLM", 64, tokenizer.vocab_size, False)

    async def start(cfg: ServeConfig, progress: Callable[[str], None]) -> object:
        return fakes.FakeCluster(info, tokenizer, reply_script(tokenizer))

    out = io.StringIO()
    seen: dict[str, object] = {}

    def client(port: str) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            req = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=2))
            try:
                list(stub.Generate(req, timeout=5))
            except grpc.RpcError as e:
                seen["without"] = e.code()
            md = (("authorization", f"Bearer {TOKEN}"),)
            seen["with"] = sum(len(m.token_ids) for m in stub.Generate(req, timeout=5, metadata=md))

    async def run() -> int:
        # serve() installs signal handlers, so it runs on the main thread; the client in another.
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, start, environ, out=out, stop=stop))  # type: ignore[arg-type]
        try:
            deadline = time.monotonic() + 30
            while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", out.getvalue())):
                assert time.monotonic() < deadline and not task.done(), out.getvalue()
                await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.to_thread(client, m.group(1)), 30)
        finally:
            stop.set()
        return await asyncio.wait_for(task, 30)

    assert asyncio.run(run()) == 0
    assert seen == {"without": grpc.StatusCode.UNAUTHENTICATED, "with": 2}
    assert TOKEN not in out.getvalue()
