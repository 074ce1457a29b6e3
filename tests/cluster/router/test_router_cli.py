"""`batonserve serve` config handling, and `generate` / `status` against a running router."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from testkit.router_harness import REPLY, RouterHarness

from batonserve.cluster.cli import build_parser, main
from batonserve.cluster.cli_serve import build_config
from batonserve.cluster.config import ServeConfig
from batonserve.workers.tokenizer import Tokenizer


def _config(*argv: str) -> ServeConfig:
    return build_config(build_parser().parse_args(["serve", *argv]))


def test_serve_defaults_are_the_embedded_setup() -> None:
    cfg = _config()
    assert cfg.model == "demo" and cfg.ray.address == ""
    assert (cfg.router.host, cfg.router.port, cfg.router.metrics_port) == ("127.0.0.1", 8001, 9400)
    assert cfg.router.http_enabled and cfg.router.http_port == 8000
    assert [(p.role, p.replicas) for p in cfg.pools] == [("prefill", 1), ("decode", 1)]
    assert cfg.router.reflection


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        "model: demo-moe\nrouter:\n  port: 9000\n  grace_period_s: 5\n"
        "pools:\n  - {name: p, role: prefill, replicas: 2}\n  - {name: d, role: decode}\n"
    )
    cfg = _config(
        "--config",
        str(path),
        "--port",
        "9100",
        "--host",
        "0.0.0.0",
        "--decode-workers",
        "3",
        "--mixed-workers",
        "1",
        "--ray-address",
        "auto",
        "--http-port",
        "9200",
        "--chat-template",
        "chat.jinja",
    )
    assert cfg.model == "demo-moe" and cfg.router.grace_period_s == 5
    assert (cfg.router.host, cfg.router.port) == ("0.0.0.0", 9100)
    assert cfg.ray.address == "auto"
    assert (cfg.router.http_port, cfg.router.chat_template) == (9200, "chat.jinja")
    assert [(p.name, p.role, p.replicas) for p in cfg.pools] == [
        ("p", "prefill", 2),
        ("d", "decode", 3),
        ("mixed", "mixed", 1),
    ]


@pytest.mark.parametrize(
    ("argv", "yaml_text", "message"),
    [
        ([], "router:\n  prot: 1\n", "router: unknown key(s) ['prot']"),
        ([], "router: [1]\n", "router: expected a mapping"),
        (["--port", "70000"], "", "router.port: must be a TCP port"),
        (["--prefill-workers", "-1"], "", "--prefill-workers: must be >= 0"),
        ([], "pools:\n  - {name: a, role: decode}\n  - {name: b, role: decode}\n", None),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    yaml_text: str,
    message: str | None,
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    extra = ["--decode-workers", "2"] if message is None else []
    assert main(["serve", "--config", str(path), *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batonserve: error: ") and "Traceback" not in err
    assert (message or "the config has 2 decode pools") in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_generate_streams_from_the_router(
    router: RouterHarness, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["generate", "--target", router.target, "--max-tokens", "6", "--seed", "3", "Hello"])
        == 0
    )
    out = capsys.readouterr()
    ids = tokenizer.encode(REPLY, add_special_tokens=False)[:6]
    assert out.out == tokenizer.decode(ids) + "\n"
    assert "6 tokens (length)" in out.err
    sp = router.cluster.requests[-1].sampling
    assert (sp.max_tokens, sp.seed, sp.temperature) == (6, 3, 0.0)


def test_generate_json(router: RouterHarness, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--target", router.target, "--max-tokens", "2", "--json", "Hi"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == 2 and record["finish_reason"] == "length"


def test_generate_reports_rpc_errors(
    router: RouterHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--target", router.target, "--max-tokens", "0", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT: sampling.max_tokens" in err and "Traceback" not in err
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    assert main(["status", "--target", dead, "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_status_prints_pools_and_workers(
    router: RouterHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--target", router.target]) == 0
    out = capsys.readouterr().out
    assert "model: tiny (LlamaForCausalLM; context 64" in out
    assert "pools: prefill, decode" in out
    lines = out.splitlines()
    assert lines[2].split()[:3] == ["WORKER", "POOL", "ROLE"]
    assert lines[3].split()[:4] == ["prefill-0", "prefill", "prefill", "yes"]
    assert lines[4].split()[:4] == ["decode-0", "decode", "decode", "yes"]
