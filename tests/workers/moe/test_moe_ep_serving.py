"""Served expert parallelism at the engine level, on a one-node local Ray (127.0.0.1).

An actor builds the engine the way a worker does (`build_ep_runner`: it leads a group with one
follower actor) and generates; the plain in-process Engine is the reference. Batches with an odd
token count split unevenly; a single sequence's decode step gives rank 1 no rows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray import cloudpickle

from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.parallel.ep_serving import build_ep_runner
from batonserve.workers.sampling_params import SamplingParams

MODEL = "demo-moe"
# 7 + 4 + 6 = 17 prompt tokens: one odd prefill batch, then 3-token decode batches (odd too).
BATCH = [[0, 17, 301, 42, 9, 1000, 77], [0, 5, 6, 7], [0, 2222, 333, 44, 555, 6]]
SINGLE = [[0, 11, 12, 13, 14]]  # decode steps of one token: rank 1 gets 0 rows
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
Result = list[tuple[list[int], list[float]]]


def _config(dtype: str, ep: int) -> EngineConfig:
    return EngineConfig(
        dtype=dtype,  # type: ignore[arg-type]
        device="cpu",
        block_size=4,
        num_kv_blocks=64,
        expert_parallel_size=ep,
    )


def _generate(engine: Engine, prompts: list[list[int]]) -> Result:
    outs = engine.generate(prompts, GREEDY)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs if lp is not None]) for o in outs]


class EPHarness:
    """An EP-leading engine inside a Ray actor, as in a served worker."""

    def __init__(self, config: EngineConfig, model: str = MODEL) -> None:
        import torch

        torch.set_num_threads(1)
        self.engine = Engine(model, config, runner_factory=build_ep_runner)

    def generate(self, prompts: list[list[int]]) -> Result:
        return _generate(self.engine, prompts)

    def tuner_forwards(self) -> int:
        stats = self.engine.runner.tuner_stats()  # type: ignore[attr-defined]
        return 0 if stats is None else int(stats.forwards)

    def followers(self) -> int:
        return len(self.engine.runner.followers)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(
        address="local",  # a cluster of its own, even when another one runs on this machine
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()


def _run_ep(
    dtype: str, model: str = MODEL, batch_prompts: list[list[int]] = BATCH
) -> tuple[Result, Result, int]:
    # The harness class travels by value: workers cannot import test modules.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor: Any = ray.remote(EPHarness).options(num_cpus=0).remote(_config(dtype, 2), model)
    try:
        assert ray.get(actor.followers.remote(), timeout=120) == 1
        batch = ray.get(actor.generate.remote(batch_prompts), timeout=120)
        single = ray.get(actor.generate.remote(SINGLE), timeout=120)
        forwards = ray.get(actor.tuner_forwards.remote(), timeout=30)
    finally:
        ray.kill(actor)
    return batch, single, forwards


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_ep2_engine_matches_plain_engine(local_ray: None, dtype: str) -> None:
    """Greedy tokens identical to the single-process engine; fp32 logprobs within 1e-5."""
    plain = Engine(MODEL, _config(dtype, 1))
    want_batch, want_single = _generate(plain, BATCH), _generate(plain, SINGLE)
    got_batch, got_single, forwards = _run_ep(dtype)
    for got, want in zip(got_batch + got_single, want_batch + want_single, strict=True):
        assert got[0] == want[0]
        if dtype == "float32":
            assert len(got[1]) == len(want[1]) == GREEDY.max_tokens
            assert max(abs(a - b) for a, b in zip(got[1], want[1], strict=True)) < 1e-5
    assert forwards > 0  # the overlap tuner chose a setting on every forward of layer 0


def test_ep2_engine_serves_qwen2_moe(local_ray: None, tiny_model: Any) -> None:
    """Qwen2-MoE (shared expert with its gate, top-k weights not renormalised) through the served
    EP path: same greedy tokens as the single engine, fp32 logprobs within 1e-5."""
    model = str(tiny_model("qwen2_moe"))
    prompts = [[0, 17, 301, 42, 9, 100, 77], [0, 5, 6, 7], [0, 222, 33, 44, 55, 6]]
    plain = Engine(model, _config("float32", 1))
    want = _generate(plain, prompts) + _generate(plain, SINGLE)
    got_batch, got_single, _ = _run_ep("float32", model, prompts)
    for got, exp in zip(got_batch + got_single, want, strict=True):
        assert got[0] == exp[0]
        assert max(abs(a - b) for a, b in zip(got[1], exp[1], strict=True)) < 1e-5
