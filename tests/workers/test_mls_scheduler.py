"""Machine-level scheduler: token budget, chunked prefill, seat cap, FCFS, preemption, handoff states."""

from __future__ import annotations

import pytest

from batonserve.workers.block_pool import BlockPool
from batonserve.workers.request import Request, RequestStatus
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import SampledToken, Scheduler, StepPlan, StepResult

P = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _req(rid: str, n: int, params: SamplingParams = P, first: int = 10) -> Request:
    return Request(rid, list(range(first, first + n)), params, eos_token_ids=(1,))


def _run(s: Scheduler, token: int = 5) -> tuple[StepPlan, list[str]]:
    """One step where every sampled request gets `token`; returns the plan and finished ids."""
    plan = s.schedule()
    res = StepResult(tuple(SampledToken(q.request_id, token) for q in plan.seqs if q.sample))
    ups = s.update(plan, res)
    return plan, [u.request_id for u in ups if u.finished]


def test_chunked_prefill_respects_budget_and_samples_only_at_the_end() -> None:
    s = Scheduler(BlockPool(64, 4), max_num_batched_tokens=8, max_num_seqs=8)
    s.add(_req("a", 19))
    chunks = []
    for _ in range(3):
        plan, _ = _run(s)
        (q,) = plan.seqs
        chunks.append((q.start_pos, len(q.token_ids), q.sample))
        assert plan.num_batched_tokens <= 8
        assert len(q.block_ids) * 4 >= q.start_pos + len(q.token_ids)
    assert chunks == [(0, 8, False), (8, 8, False), (16, 3, True)]
    assert s.requests["a"].output_token_ids == [5]
    plan, _ = _run(s)  # decode: one token
    assert [(q.start_pos, len(q.token_ids)) for q in plan.seqs] == [(19, 1)]


def test_budget_shared_running_first_then_fcfs_admission() -> None:
    s = Scheduler(BlockPool(64, 4), max_num_batched_tokens=10, max_num_seqs=8)
    s.add(_req("a", 6))
    _run(s)  # a prefilled, now decoding
    s.add(_req("b", 20))
    s.add(_req("c", 2))
    plan, _ = _run(s)
    # a decodes (1 token), b takes the remaining 9 as a chunk; c must wait (FCFS, no budget).
    assert [(q.request_id, len(q.token_ids)) for q in plan.seqs] == [("a", 1), ("b", 9)]
    assert [r.request_id for r in s.waiting] == ["c"]
    assert s.stats().num_batched_tokens == 10


def test_max_num_seqs_caps_running() -> None:
    s = Scheduler(BlockPool(64, 4), max_num_batched_tokens=100, max_num_seqs=2)
    for i in range(4):
        s.add(_req(f"r{i}", 3))
    plan, _ = _run(s)
    assert [q.request_id for q in plan.seqs] == ["r0", "r1"]
    st = s.stats()
    assert (st.num_running, st.num_waiting) == (2, 2)


def test_head_of_queue_is_not_overtaken_when_blocks_run_out() -> None:
    s = Scheduler(BlockPool(6, 4), max_num_batched_tokens=100, max_num_seqs=8)
    s.add(_req("a", 12))  # 3 blocks
    s.add(_req("big", 16))  # needs 4 (+1 for its first output): does not fit beside a
    s.add(_req("small", 2))  # would fit, but must not overtake "big"
    plan, _ = _run(s)
    assert [q.request_id for q in plan.seqs] == ["a"]
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_preemption_by_recompute_frees_blocks_and_requeues_first() -> None:
    pool = BlockPool(4, 4)
    s = Scheduler(pool, max_num_batched_tokens=100, max_num_seqs=8)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    s.add(_req("old", 7, params))
    s.add(_req("new", 7, params, first=40))
    _run(s)  # both prefilled: 2 + 2 blocks, pool full
    assert pool.num_free_blocks == 0
    plan, _ = _run(s)  # old needs a 3rd block at position 8? not yet: 7 prompt + 1 output = 8
    assert not plan.preempted
    plan, _ = _run(s)  # position 8 needs block 3 for both: the newest is preempted
    assert plan.preempted == ("new",)
    assert [q.request_id for q in plan.seqs] == ["old"]
    new = s.waiting[0]
    assert new.request_id == "new" and new.block_ids == [] and new.num_computed_tokens == 0
    assert new.status is RequestStatus.WAITING and len(new.output_token_ids) == 2
    assert s.stats().num_preemptions == 1
    # Once old finishes, new is recomputed from prompt + its two outputs in one step.
    while "old" in s.requests:
        _run(s)
    plan, _ = _run(s)
    (q,) = [q for q in plan.seqs if q.request_id == "new"]
    assert q.start_pos + len(q.token_ids) == 9 and q.sample


def test_prefix_hit_skips_full_blocks_but_recomputes_last_token() -> None:
    pool = BlockPool(32, 4)
    s = Scheduler(pool, max_num_batched_tokens=100, max_num_seqs=8)
    s.add(_req("a", 12, SamplingParams(max_tokens=1, temperature=0.0)))
    _run(s)  # a finishes; its 3 full blocks stay cached
    s.add(_req("b", 12))
    plan, _ = _run(s)
    (q,) = plan.seqs
    # 12 tokens = 3 full blocks, but the last token must run for logits: 2 blocks hit.
    assert (q.start_pos, len(q.token_ids)) == (8, 4)
    assert s.requests["b"].num_cached_tokens == 8
    st = s.stats()
    assert (st.prefix_queries, st.prefix_hits) == (24, 8)


def test_abort_prefill_only_release_and_import() -> None:
    pool = BlockPool(16, 4)
    s = Scheduler(pool, max_num_batched_tokens=100, max_num_seqs=8)
    req = _req("p", 6)
    req.prefill_only = True
    s.add(req)
    plan, fin = _run(s)
    assert not fin and s.requests["p"].status is RequestStatus.PREFILLED
    assert not s.has_unfinished() and s.stats().num_pinned == 1 and pool.num_free_blocks == 14
    assert s.release("p") and pool.num_free_blocks == 16
    assert not s.release("p")  # idempotent

    imp = _req("i", 6)
    imp.output_token_ids.append(7)
    blocks = s.import_request(imp)
    assert len(blocks) == 2 and not s.has_unfinished()
    s.commit_import("i")
    plan, _ = _run(s)
    assert [(q.start_pos, q.token_ids) for q in plan.seqs] == [(6, (7,))]
    with pytest.raises(ValueError, match="request_id"):
        s.add(_req("i", 3))
    assert s.abort("i") and not s.abort("i")
    assert pool.num_free_blocks == 16


def test_stop_token_eos_and_length() -> None:
    s = Scheduler(BlockPool(16, 4), max_num_batched_tokens=100)
    s.add(Request("eos", [3, 4], SamplingParams(temperature=0.0), eos_token_ids=(5,)))
    s.add(Request("stop", [3, 4], SamplingParams(stop_token_ids=[5], ignore_eos=True)))
    s.add(Request("len", [3, 4], SamplingParams(max_tokens=2, ignore_eos=True)))
    s.add(Request("ctx", [3, 4], SamplingParams(ignore_eos=True), max_model_len=3))
    _, fin = _run(s, token=5)
    assert sorted(fin) == ["ctx", "eos", "stop"]
    _, fin = _run(s, token=5)
    assert fin == ["len"]
