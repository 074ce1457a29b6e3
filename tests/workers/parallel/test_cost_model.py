"""Cost model: bytes per step by schedule, and the choice it makes from heads, cached tokens and N."""

from __future__ import annotations

import pytest

from batonserve.workers.parallel import (
    AttentionDims,
    HardwareModel,
    SPShape,
    bytes_sent_per_step,
    choose_schedule,
    estimate,
)

SLOW_LINK = HardwareModel(flops_per_s=1e15, link_bytes_per_s=1e9, step_latency_s=0.0)


def _busiest(schedule: str, shape: SPShape) -> int:
    """Bytes on the busiest link in the heaviest step of any rank."""
    return estimate(schedule, shape, SLOW_LINK).busiest_step_bytes


def test_gqa_pass_q_moves_more_mha_fewer() -> None:
    """Per busiest link: GQA 32:8 makes pass-Q ~2x pass-KV; MHA makes it ~half."""
    gqa = SPShape(32, 8, 128, 8192, 0, 4)
    mha = SPShape(32, 32, 128, 8192, 0, 4)
    assert _busiest("tokenring", gqa) > 1.9 * _busiest("ring", gqa)
    assert _busiest("tokenring", mha) < 0.55 * _busiest("ring", mha)
    assert choose_schedule(gqa, SLOW_LINK) == "ring"
    assert choose_schedule(mha, SLOW_LINK) == "tokenring"


def test_long_cached_prefix_favours_pass_q_even_with_gqa() -> None:
    """512 new tokens over a 32k cached prefix: KV blocks dwarf the queries."""
    shape = SPShape(32, 8, 128, 512, 32768, 4)
    assert _busiest("tokenring", shape) < _busiest("ring", shape) / 10
    assert choose_schedule(shape, SLOW_LINK) == "tokenring"


def test_allgather_never_hides_and_single_rank_needs_no_comm() -> None:
    """All-gather pays its transfer up front; N = 1 moves nothing."""
    shape = SPShape(8, 8, 64, 4096, 0, 4)
    assert (
        estimate("allgather", shape, SLOW_LINK).time_s > estimate("ring", shape, SLOW_LINK).time_s
    )
    one = SPShape(8, 2, 64, 4096, 0, 1)
    for s in ("ring", "tokenring", "allgather"):
        assert estimate(s, one, SLOW_LINK).comm_s == 0.0
    assert choose_schedule(one) == "ring"


def test_bytes_per_step_formulas() -> None:
    """Exact per-step bytes for uneven rows: ring sends held KV, tokenring queries and results."""
    dims = AttentionDims(4, 2, 8, 2)
    n_q, n_kv = [3, 2, 0], [5, 2, 1]
    ring = bytes_sent_per_step("ring", n_q, n_kv, 1, dims)
    kv_row = 2 * 2 * 8 * 2
    assert [b.fwd for b in ring] == [2 * kv_row, 5 * kv_row, 0] and all(b.back == 0 for b in ring)
    tr = bytes_sent_per_step("tokenring", n_q, n_kv, 1, dims)
    q_row, res_row = 4 * 8 * 2, 4 * 8 * 2 + 4 * 4
    assert [b.fwd for b in tr] == [2 * q_row, 3 * q_row, 0]
    assert [b.back for b in tr] == [0, 3 * res_row, 0]
    ag = bytes_sent_per_step("allgather", n_q, n_kv, 0, dims)
    assert [b.fwd for b in ag] == [2 * 5 * kv_row]


def test_bad_shapes_raise_naming_the_field() -> None:
    """User errors name the bad field."""
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionDims(6, 4, 8, 2)
    with pytest.raises(ValueError, match="world_size"):
        SPShape(4, 4, 8, 10, 0, 0)
    with pytest.raises(ValueError, match="schedule"):
        bytes_sent_per_step("spiral", [1], [1], 0, AttentionDims(1, 1, 1, 1))
