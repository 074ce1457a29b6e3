"""`batonserve serve` with tensor-parallel pools (TP=2 prefill and decode, gloo on CPU): tokens
equal the offline single engine's; `batonserve status` and the metrics show TP size and per-rank
memory."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator

import pytest
from testkit.serve_process import Server, cli, serve_config, serving

pytestmark = pytest.mark.cluster

PROMPT = "def main("
TP_POOLS = """
engine:
  dtype: float32
pools:
  - {name: prefill, role: prefill, num_cpus: 0.5, tensor_parallel_size: 2}
  - {name: decode, role: decode, num_cpus: 0.5, tensor_parallel_size: 2}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The served demo at TP=2; stopped (SIGTERM) after the module's tests."""
    with serving(["--config", serve_config(tmp_path_factory.mktemp("serve-tp"), TP_POOLS)]) as s:
        yield s


def test_tp2_serve_matches_offline_and_reports_ranks(server: Server) -> None:
    """Greedy tokens through TP=2 prefill -> TP=2 decode equal `generate --offline`'s; status
    lists TP 2 and two per-rank sizes; the metrics carry both gauges."""
    port = server.wait_for(r"router listening on 127\.0\.0\.1:(\d+)", 5).group(1)
    metrics = server.wait_for(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", 5).group(1)
    target = f"127.0.0.1:{port}"
    remote = cli("generate", "--target", target, "--max-tokens", "12", "--json", PROMPT)
    assert remote.returncode == 0, remote.stderr
    offline = cli(
        "generate", "--offline", "--model", "demo", "--dtype", "float32",
        "--max-tokens", "12", "--json", PROMPT,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    got, want = json.loads(remote.stdout), json.loads(offline.stdout)
    assert got["token_ids"] == want["token_ids"] and len(want["token_ids"]) == 12

    status = cli("status", "--target", target)
    assert status.returncode == 0, status.stderr
    rows = {ln.split()[0]: ln.split() for ln in status.stdout.splitlines()[3:]}
    for name in ("prefill-0", "decode-0"):
        tp, per_rank = rows[name][-2], rows[name][-1].split("/")
        assert tp == "2" and len(per_rank) == 2 and all(float(m) > 0 for m in per_rank)

    body = urllib.request.urlopen(metrics, timeout=10).read().decode()
    assert re.search(r'batonserve_worker_tensor_parallel_size\{[^}]*worker="decode-0"\} 2', body)
    ranks = re.findall(
        r'batonserve_worker_rank_param_bytes\{[^}]*worker="decode-0"[^}]*\} (\S+)', body
    )
    assert len(ranks) == 2 and all(float(b) > 0 for b in ranks)
