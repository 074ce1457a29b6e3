"""`batonserve serve` with demo-moe at TP=2 (prefill and decode, gloo on CPU), experts served from
each rank's tiered store at 50% residency, prefetching in lockstep (demo-moe's bundled predictor):
greedy tokens equal the offline all-resident engine's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from testkit.serve_process import QUIET, Server, cli, serving

pytestmark = pytest.mark.cluster

PROMPT = "def main("
CONFIG = (
    QUIET.replace("model: demo\n", "model: demo-moe\n")
    + """
engine:
  dtype: float32
  expert_cache_policy: lru
  expert_cache_fraction: 0.5
pools:
  - {name: prefill, role: prefill, num_cpus: 0.5, tensor_parallel_size: 2}
  - {name: decode, role: decode, num_cpus: 0.5, tensor_parallel_size: 2}
"""
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The served demo-moe at TP=2 with the expert store; stopped (SIGTERM) after the tests."""
    path = tmp_path_factory.mktemp("serve-tp-store") / "config.yaml"
    path.write_text(CONFIG)
    with serving(["--config", str(path)]) as s:
        yield s


def test_tp2_expert_store_serve_matches_offline_all_resident(server: Server) -> None:
    port = server.wait_for(r"router listening on 127\.0\.0\.1:(\d+)", 5).group(1)
    remote = cli(
        "generate", "--target", f"127.0.0.1:{port}", "--max-tokens", "12", "--json", PROMPT
    )
    assert remote.returncode == 0, remote.stderr
    offline = cli(
        "generate", "--offline", "--model", "demo-moe", "--dtype", "float32",
        "--max-tokens", "12", "--json", PROMPT,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    got, want = json.loads(remote.stdout), json.loads(offline.stdout)
    assert got["token_ids"] == want["token_ids"] and len(want["token_ids"]) == 12
