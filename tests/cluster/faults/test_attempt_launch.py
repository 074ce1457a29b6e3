"""Two restarts of one request in the same event-loop turn (two workers gone at once, as the chaos
harness does it) launch each attempt once: the older launch task must not launch the newer attempt
too, which submitted one worker-level id twice and got it refused ("already in use")."""

from __future__ import annotations

import pytest
from cluster_checks import prompt_of, wait_idle
from loop_thread import LoopThread
from scripted_reference import scripted_reference

from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import start_cluster
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

pytestmark = pytest.mark.cluster

SCRIPTED = ScriptedEngineConfig(layer_delay_s=0.005)


def test_two_restarts_in_one_turn_launch_each_attempt_once(
    ray_cluster: str, loop_thread: LoopThread
) -> None:
    cfg = ServeConfig(
        model="scripted",
        ray=RayConfig(address=ray_cluster, namespace="attempt-launch"),
        pools=(
            PoolConfig("prefill", "prefill", num_cpus=0.25, resources={"prefill_node": 1}),
            PoolConfig("decode", "decode", num_cpus=0.25, resources={"decode_node": 1}),
        ),
    )
    cluster = loop_thread.run(start_cluster(cfg, lambda _: None, scripted=SCRIPTED))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompt = prompt_of(5, 10)  # short: in place on the decode worker

    async def run() -> tuple[list[int], int]:
        stream = cluster.generate(GenerateRequest("twice", tuple(prompt), params))
        st = cluster.requests["twice"]
        toks: list[int] = []
        async for d in stream:
            toks += d.token_ids
            if len(toks) == 2:  # mid-stream: restart twice before any launch task runs
                cluster.restart(st, "test: first")
                cluster.restart(st, "test: second")
        return toks, st.attempts

    try:
        toks, attempts = loop_thread.run(run(), timeout=60)
        assert toks == scripted_reference(SCRIPTED, [prompt], params)[0]
        assert attempts == 3  # the first, then one per restart: no refusal forced a fourth
        wait_idle(cluster)
    finally:
        loop_thread.run(cluster.shutdown())
