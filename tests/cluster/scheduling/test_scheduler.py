"""The cluster-level scheduler: pairing modes, conditional disaggregation, admission control."""

from __future__ import annotations

from sched_helpers import worker

from batonserve.cluster.scheduling import (
    AdmissionConfig,
    ClusterScheduler,
    Pairing,
    PrefixIndex,
    Rejection,
    RejectReason,
    RequestView,
    SchedulerConfig,
    assume_assigned,
)
from batonserve.workers.block_pool import hash_blocks


def sched(**kw: object) -> ClusterScheduler:
    return ClusterScheduler(SchedulerConfig(**kw))  # type: ignore[arg-type]


def cluster() -> list:
    return [
        worker("prefill-0", "prefill", pending=4000),
        worker("prefill-1", "prefill", pending=100),
        worker("decode-0", "decode", free=20),
        worker("decode-1", "decode", free=80),
    ]


def test_splitwise_pairs_both_workers_at_arrival() -> None:
    d = sched().schedule(RequestView("r", prompt_len=1000, max_tokens=8), cluster())
    assert d == Pairing("r", "prefill-1", "decode-1", "disaggregated", 0)


def test_short_prompt_is_prefilled_in_place_on_a_decode_worker() -> None:
    d = sched(in_place_max_tokens=256).schedule(RequestView("r", 200, 8), cluster())
    assert isinstance(d, Pairing) and d.mode == "in_place"
    assert d.prefill_worker == d.decode_worker == "decode-1"  # most free KV
    d = sched(conditional_disaggregation=False).schedule(RequestView("r", 200, 8), cluster())
    assert isinstance(d, Pairing) and d.mode == "disaggregated"


def test_cached_prefix_on_a_decode_worker_pulls_the_prompt_there() -> None:
    prompt = list(range(1000))
    hashes = tuple(hash_blocks(prompt, 16))
    index = PrefixIndex()
    index.add("decode-0", hashes[:60])  # 960 of 1000 tokens cached on the fuller worker
    s = ClusterScheduler(SchedulerConfig(in_place_max_tokens=64), index)
    ws = cluster()
    ws[2] = worker("decode-0", "decode", free=70)  # room for the whole prompt, less than decode-1
    d = s.schedule(RequestView("r", 1000, 8, prefix_block_hashes=hashes), ws)
    assert d == Pairing("r", "decode-0", "decode-0", "in_place", 960)
    # A broken chain (block 0 missing) is no prefix hit.
    index.discard("decode-0", hashes[:1])
    d = s.schedule(RequestView("r", 1000, 8, prefix_block_hashes=hashes), ws)
    assert isinstance(d, Pairing) and d.mode == "disaggregated"


def test_mixed_worker_runs_both_phases_itself() -> None:
    ws = [worker("m-0", "mixed", pending=50), worker("m-1", "mixed", pending=10)]
    d = sched(conditional_disaggregation=False).schedule(RequestView("r", 1000, 8), ws)
    assert d == Pairing("r", "m-1", "m-1", "in_place", 0)


def test_without_prefill_workers_every_prompt_runs_in_place() -> None:
    ws = [worker("prefill-0", "prefill", healthy=False), worker("decode-0", "decode")]
    d = sched().schedule(RequestView("r", 1000, 8), ws)
    assert d == Pairing("r", "decode-0", "decode-0", "in_place", 0)


def test_rejections_name_their_reason() -> None:
    adm = AdmissionConfig(max_queue_len=2, max_prompt_tokens=5000, kv_headroom_fraction=0.1)
    s = sched(admission=adm, conditional_disaggregation=False)
    r = s.schedule(RequestView("r", 6000, 8), cluster())
    assert isinstance(r, Rejection) and r.reason is RejectReason.PROMPT_TOO_LONG
    r = s.schedule(RequestView("r", 100 * 16, 8), cluster())  # needs all blocks, headroom 10%
    assert isinstance(r, Rejection) and r.reason is RejectReason.PROMPT_TOO_LONG
    full = [worker("p", "prefill", waiting=2), worker("d", "decode")]
    r = s.schedule(RequestView("r", 1000, 8), full)
    assert isinstance(r, Rejection) and r.reason is RejectReason.QUEUE_FULL
    assert "max_queue_len=2" in r.message
    tight = [worker("p", "prefill"), worker("d", "decode", free=70)]  # 63 blocks + 10 headroom
    r = s.schedule(RequestView("r", 63 * 16, 8), tight)
    assert isinstance(r, Rejection) and r.reason is RejectReason.KV_EXHAUSTED
    dead = [worker("p", "prefill"), worker("d", "decode", healthy=False)]
    r = s.schedule(RequestView("r", 10, 8), dead)
    assert isinstance(r, Rejection) and r.reason is RejectReason.NO_HEALTHY_WORKER


def test_pending_token_limit_skips_busy_workers_but_idle_ones_take_anything() -> None:
    adm = AdmissionConfig(max_pending_prefill_tokens=3000)
    s = sched(admission=adm, policy="round_robin")
    # Round robin would start with prefill-0, but 4000 pending tokens are over the limit.
    d = s.schedule(RequestView("r", 1000, 8), cluster())
    assert isinstance(d, Pairing) and d.prefill_worker == "prefill-1"
    big = [worker("p", "prefill", pending=0), worker("d", "decode", free=1000, total=1000)]
    assert isinstance(s.schedule(RequestView("r", 9000, 8), big), Pairing)
    big[0] = worker("p", "prefill", pending=1)
    r = s.schedule(RequestView("r", 9000, 8), big)
    assert isinstance(r, Rejection) and r.reason is RejectReason.QUEUE_FULL


def test_reserved_output_tokens_count_against_kv() -> None:
    s = sched(admission=AdmissionConfig(reserve_output_tokens=512))
    ws = [worker("p", "prefill"), worker("d0", "decode", free=40), worker("d1", "decode", free=33)]
    # 500 prompt + min(512, 20) output = 520 tokens = 33 blocks: both fit; with 600 output
    # tokens, 1012 tokens = 64 blocks fit neither.
    assert isinstance(s.schedule(RequestView("r", 500, 20), ws), Pairing)
    r = s.schedule(RequestView("r", 500, 600), ws)
    assert isinstance(r, Rejection) and r.reason is RejectReason.KV_EXHAUSTED


def test_assume_assigned_spreads_a_burst_decided_on_one_snapshot() -> None:
    s = sched(conditional_disaggregation=False)
    ws = [worker(f"p{i}", "prefill") for i in range(3)] + [
        worker(f"d{i}", "decode", free=100) for i in range(3)
    ]
    picks = []
    for i in range(6):
        req = RequestView(f"r{i}", 800, 8)
        d = s.schedule(req, ws)
        assert isinstance(d, Pairing)
        picks.append((d.prefill_worker, d.decode_worker))
        ws = assume_assigned(ws, req, d)
    assert sorted(p for p, _ in picks) == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert sorted(d for _, d in picks) == ["d0", "d0", "d1", "d1", "d2", "d2"]
