"""The machine-level scheduler regroups decode tokens by forecast experts, within a wait bound."""

from __future__ import annotations

import random

import pytest

from batonserve.workers.block_pool import BlockPool
from batonserve.workers.regroup import ExpertPath, RegroupConfig
from batonserve.workers.request import Request
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import SampledToken, Scheduler, StepResult

LAYERS, EXPERTS = 4, 8


def path(token: int) -> ExpertPath:
    """Tokens 0..99 route to experts 0-3 and 100..199 to 4-7: two 'topics' (one expert a layer)."""
    return frozenset((layer, (token // 100) * 4 + (token + layer) % 4) for layer in range(LAYERS))


def drive(n_req: int, cfg: RegroupConfig | None, max_tokens: int = 12, seed: int = 0):  # type: ignore[no-untyped-def]
    """Decode n_req requests (half of each topic) to the end; returns (scheduler, distinct, sizes).

    distinct: per step with decode tokens, the union of their forecast paths' sizes.
    """
    rng = random.Random(seed)
    s = Scheduler(BlockPool(256, 4), 256, 64, cfg, path if cfg else None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    topic = {f"r{i}": (i % 2) * 100 for i in range(n_req)}
    for rid, base in topic.items():
        s.add(Request(rid, [base + rng.randrange(100) for _ in range(5)], params))
    distinct: list[int] = []
    sizes: list[int] = []
    while s.has_unfinished():
        plan = s.schedule()
        decode = [q for q in plan.seqs if len(q.token_ids) == 1]
        if decode:
            distinct.append(len(set().union(*(path(q.token_ids[0]) for q in decode))))
            sizes.append(len(decode))
        # A request's next token mostly stays in its topic.
        sampled = tuple(
            SampledToken(q.request_id, topic[q.request_id] + rng.randrange(100))
            for q in plan.seqs
            if q.sample
        )
        s.update(plan, StepResult(sampled))
    return s, distinct, sizes


def test_regrouping_caps_decode_batch_and_shares_experts() -> None:
    """At most batch_size decode tokens a step, fewer distinct experts than oldest-first."""
    cfg = RegroupConfig(batch_size=4, max_wait_steps=3)
    grouped, distinct, sizes = drive(12, cfg)
    _, fifo_distinct, fifo_sizes = drive(12, RegroupConfig(4, 3, by_experts=False))
    assert max(sizes) == 4 and max(fifo_sizes) == 4
    assert sum(distinct) / len(distinct) < 0.8 * sum(fifo_distinct) / len(fifo_distinct)
    st = grouped.stats()
    assert 0 < st.regroup_max_wait <= cfg.max_wait_steps
    assert st.regroup_deferred > 0
    # Every decode token is counted once: 12 requests x 11 decode tokens (the first is prefill's).
    assert sum(grouped.regroup_waits.values()) == 12 * 11


def test_wait_bound_holds_when_more_tokens_are_due_than_fit() -> None:
    """With 10 requests, batch 1 and bound 1, the batch grows rather than break the bound."""
    s, _, sizes = drive(10, RegroupConfig(batch_size=1, max_wait_steps=1))
    assert s.stats().regroup_max_wait <= 1
    assert max(sizes) > 1


def test_off_by_default_every_decode_token_runs() -> None:
    """Without a RegroupConfig every running request decodes every step."""
    s, _, sizes = drive(6, None)
    assert set(sizes) == {6}
    assert s.stats().regroup_deferred == 0 and not s.regroup_waits


def test_regroup_without_forecaster_is_an_error() -> None:
    """A RegroupConfig with no expert_path names what is missing."""
    with pytest.raises(ValueError, match="regroup: token regrouping needs an expert_path"):
        Scheduler(BlockPool(8, 4), regroup=RegroupConfig(2, 2))
