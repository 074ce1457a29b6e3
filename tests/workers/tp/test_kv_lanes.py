"""send_heads and StagedKV together, without Ray: every prefill rank of a TP=a group sends its
routes' heads, every decode rank of a TP=b group stages what it receives, and each decode rank
ends up with exactly its heads of the whole-head KV (a, b in 1..4, KV heads 1..8)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from batonserve.workers.handoff_io import StagedKV
from batonserve.workers.kv_transfer.base import KVChunk, KVSpec, split_peer
from batonserve.workers.tp.kv_lanes import KVLanes, send_heads
from batonserve.workers.tp.kv_routes import head_routes
from batonserve.workers.tp.shard import TPShard

LAYERS, PROMPT, HEAD_DIM = 2, 5, 3


class _Recorder:
    """A transport that records what each peer name would receive."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, KVChunk]] = []

    def send(self, peer: str, chunk: KVChunk) -> None:
        self.sent.append((peer, chunk))


def _valid(num_kv: int, size: int) -> bool:
    return num_kv % size == 0 or size % num_kv == 0


CASES = [
    (kv, a, b)
    for kv, a, b in itertools.product(range(1, 9), range(1, 5), range(1, 5))
    if _valid(kv, a) and _valid(kv, b)
]


@pytest.mark.parametrize(("num_kv", "a", "b"), CASES)
def test_each_decode_rank_stages_exactly_its_heads(num_kv: int, a: int, b: int) -> None:
    spec = KVSpec("m", "float32", LAYERS, num_kv, HEAD_DIM, 4)
    whole = torch.randn(LAYERS, 2, PROMPT, num_kv, HEAD_DIM)  # the model's KV of the prompt
    slots = torch.arange(PROMPT)
    routes = head_routes(num_kv, a, b)
    out = _Recorder()
    for i in range(a):
        lo, hi = TPShard(i, a).kv_heads(num_kv)

        def read(layer: int, at: torch.Tensor, lo: int = lo, hi: int = hi) -> Any:
            return whole[layer, 0, at, lo:hi], whole[layer, 1, at, lo:hi]

        mine = [r for r in routes if r.src == i]
        for layer in range(LAYERS):  # two runs: positions [0, 2) and [2, 5)
            send_heads(read, out, mine, lo, "d", 7, layer, slots, [(0, 2, 0), (2, 5, 2)])  # type: ignore[arg-type]
    for j in range(b):
        heads = TPShard(j, b).kv_heads(num_kv)
        staged = StagedKV(spec, PROMPT, heads, "cpu")
        for peer, chunk in out.sent:
            assert split_peer(peer)[0] == "d"
            if split_peer(peer)[1] == j:
                staged.add(chunk)
        assert staged.full
        assert torch.equal(staged.buf, whole[:, :, :, heads[0] : heads[1]])
        assert staged.nbytes == staged.buf.numel() * 4  # nothing twice


def test_rank_peer_names_round_trip() -> None:
    from batonserve.workers.kv_transfer.base import rank_peer

    for name in ("decode-0", "a/tp", "x/tpy"):
        for rank in range(4):
            assert split_peer(rank_peer(name, rank)) == (name, rank)


def test_an_expert_parallel_runner_is_one_lane() -> None:
    """An EP runner has followers too (expert-parallel ones), but its KV lives on rank 0 alone:
    its worker is one lane, never a TP group (taking them as ranks failed every EP handoff)."""

    class Engine:
        def __init__(self, runner: Any) -> None:
            self.runner = runner

        def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            raise AssertionError("not read here")

    class EPRunner:
        followers = ("ep-follower",)

    class TPRunner:
        followers = ("rank-1",)
        tp_size = 2

    spec = KVSpec("m", "float32", 2, 2, 4, 4)
    ep = KVLanes(Engine(EPRunner()), None, spec)  # type: ignore[arg-type]
    assert (ep.size, ep.followers) == (1, [])
    tp = KVLanes(Engine(TPRunner()), None, spec)  # type: ignore[arg-type]
    assert (tp.size, tp.followers) == (2, ["rank-1"])
