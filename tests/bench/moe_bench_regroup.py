"""Part of bench_moe.py: the served engine with and without token regrouping, same decode cap.

"fifo" and "regroup" cap decode at `batch` tokens per step with the same wait bound; "fifo" takes
the oldest tokens, "regroup" the ones whose forecast experts overlap (workers/regroup.py); "off"
decodes every request every step (the engine's default). Experts come from
the tiered store (predictive policy, a quarter of expert bytes, prefetch on) so the hit rate and
stall show what sharing experts buys. The OS page cache is not dropped here: a miss copies from
RAM-cached file pages.
"""

from __future__ import annotations

import time

from moe_bench_cache import MODEL

from batonserve.cluster.bench.report import percentile
from batonserve.workers.engine import Engine
from batonserve.workers.regroup import RegroupConfig
from batonserve.workers.sampling_params import SamplingParams


def run_regroup(
    prompts: list[list[int]], new_tokens: int, batch: int, max_wait: int, mode: str
) -> tuple[dict[str, float], list[list[int]]]:
    """Serve every prompt together: figures over the decode steps (step 1 prefills all), tokens."""
    engine = Engine.from_model(
        MODEL,
        device="cpu",
        num_kv_blocks=256,
        moe_regroup_batch=0 if mode == "off" else batch,
        moe_regroup_max_wait=max_wait,
        expert_cache_policy="predictive",
        expert_cache_fraction=0.25,
    )
    if mode == "fifo":
        engine.core.scheduler.regroup = RegroupConfig(batch, max_wait, by_experts=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    try:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        engine.step()  # prefill (every prompt fits the token budget)
        first = engine.stats().moe
        t0 = time.perf_counter()
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = out.token_ids
        wall = time.perf_counter() - t0
        st = engine.stats()
        end = st.moe
        assert first is not None and end is not None
        forwards = end.forwards - first.forwards
        demands = end.demand_accesses - first.demand_accesses
        hits = sum(map(sum, end.expert_hits)) - sum(map(sum, first.expert_hits))
        decoded = len(prompts) * (new_tokens - 1)
        waits = sorted(engine.core.scheduler.regroup_waits.elements())
    finally:
        engine.runner.close()  # type: ignore[attr-defined]
    figures = {
        "distinct_per_layer": (end.distinct_experts - first.distinct_experts)
        / (forwards * end.num_layers),
        "forwards": float(forwards),
        "hit_rate": hits / demands,
        "stall_ms_per_token": 1e3 * (end.stall_seconds - first.stall_seconds) / decoded,
        "ms_per_token": 1e3 * wall / decoded,
        "wait_p50": percentile(waits, 50) if waits else 0.0,
        "wait_p99": percentile(waits, 99) if waits else 0.0,
        "wait_max": float(max(waits, default=0)),
    }
    return figures, [tokens[str(i)] for i in range(len(prompts))]
