"""Two settings for reproducing Splitwise's provisioning study: the paper's own, and ours.

`paper_setting()` follows what produced the paper's figures (SplitwiseSim's configs and
notebooks, Mutinifni/splitwise-sim): whole prompts batched up to 2048 tokens (a longer prompt
runs alone), at most 512 requests a step, prompts before decodes; no conditional
disaggregation; decode time nearly flat in batch size (the table read against batch tokens);
KV sized without GQA (2 x layers x hidden x 2 bytes, 2.6 MB a token for Llama-2-70B) in 80 GiB
GPUs after 135 GB of weights; the KV copied after the prompt (no layer-wise overlap) at
200 GiB/s; slowdowns against the prompt alone in one step on a DGX-A100; and the notebooks'
machine figures (DGX-A100 cost 2.21, power 24.8; DGX-H100 4.76 and 44; the capped H100 at 70%
power), so 40 DGX-H100s draw what 70 DGX-A100s do and cost what 86 do.

`ours_setting()` is batonserve's: the engine's chunked prefill (2048 tokens, 64 requests),
conditional disaggregation (prompts up to 256 tokens in place), GQA-sized KV, layer-wise
transfer, the engine-chunked reference, and the same machine figures, so the two differ only in
how the cluster serves, not in what it costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.cluster.sim.hardware import DEFAULT_MODELS, MachineSpec, ModelSpec
from batonserve.cluster.sim.metrics import Reference
from batonserve.cluster.sim.perf_model import SPLITWISE_TABLE, TablePerfModel
from batonserve.cluster.sim.planner import PlanSetup
from batonserve.cluster.sim.simulator import SimConfig
from batonserve.cluster.sim.trace import TraceRequest
from batonserve.cluster.sim.worker import EngineLimits

Setting = Literal["paper", "ours"]

_GIB = 1024**3

# SplitwiseSim's notebooks (utils.py): per-machine cost and provisioned power, in their units;
# its GPUs hold 80 GiB and its KV transfer runs at 200 GiB/s.
_GPU_GB = 80 * _GIB / 1e9
_LINK_GBPS = 200 * _GIB / 1e9
PAPER_MACHINES: dict[str, MachineSpec] = {
    name: MachineSpec(
        name, cost, power, gpu_memory_gb=_GPU_GB, link_gb_per_s=_LINK_GBPS, kv_memory_fraction=1.0
    )
    for name, cost, power in (
        ("a100-80gb", 2.21, 24.8),
        ("h100-80gb", 4.76, 44.0),
        ("h100-80gb-pcap", 4.76, 44.0 * 0.7),
    )
}

# SplitwiseSim sizes KV by the hidden size (8192), i.e. without Llama-2's grouped KV heads.
PAPER_LLAMA = ModelSpec(
    "llama2-70b", num_layers=80, num_kv_heads=64, head_dim=128, weight_bytes=135e9
)
# BLOOM-176B as SplitwiseSim configures it: hidden 14336 = 112 heads x 128, 70 layers, 329 GB of
# weights (4.0 MB of KV a token). It is SplitwiseSim's default model (configs/applications/
# solo.yaml) and its plotting notebook's `model_to_plot`.
PAPER_BLOOM = ModelSpec(
    "bloom-176b", num_layers=70, num_kv_heads=112, head_dim=128, weight_bytes=329e9
)
PAPER_MODELS: dict[str, ModelSpec] = {m.name: m for m in (PAPER_LLAMA, PAPER_BLOOM)}


@dataclass(frozen=True)
class SettingSpec:
    """How a setting serves: batching, cluster scheduler, KV model, transfer, reference."""

    name: Setting
    limits: EngineLimits
    scheduler: SchedulerConfig
    model: ModelSpec
    machines: dict[str, MachineSpec]
    decode_axis: str
    layerwise_transfer: bool
    paper_reference: bool


def _machines_with_ours(base: dict[str, MachineSpec]) -> dict[str, MachineSpec]:
    """The paper's cost and power figures on batonserve's memory and link model."""
    return {
        name: dataclasses.replace(m, gpu_memory_gb=80.0, link_gb_per_s=gbps, kv_memory_fraction=0.9)
        for (name, m), gbps in zip(base.items(), (200.0, 400.0, 400.0), strict=True)
    }


def setting_spec(name: Setting, model: str = "llama2-70b") -> SettingSpec:
    """The named setting, for Llama-2-70B or BLOOM-176B (the two models of the profile table)."""
    if model not in PAPER_MODELS:
        raise ValueError(f"model: one of {sorted(PAPER_MODELS)}, got {model!r}")
    if name == "paper":
        return SettingSpec(
            name,
            EngineLimits(max_num_batched_tokens=2048, max_num_seqs=512, batching="splitwise"),
            SchedulerConfig(
                conditional_disaggregation=False,
                mixed_pool=MixedPoolConfig(borrow_prefill_tokens=8192, cooldown_s=0.0),
            ),
            PAPER_MODELS[model],
            dict(PAPER_MACHINES),
            decode_axis="tokens",
            layerwise_transfer=False,
            paper_reference=True,
        )
    if name == "ours":
        return SettingSpec(
            name,
            EngineLimits(),
            SchedulerConfig(),
            DEFAULT_MODELS[model],
            _machines_with_ours(PAPER_MACHINES),
            decode_axis="batch",
            layerwise_transfer=True,
            paper_reference=False,
        )
    raise ValueError(f"setting: 'paper' or 'ours', got {name!r}")


def plan_setup(
    name: Setting,
    requests: Sequence[TraceRequest],
    seed: int = 0,
    model: str = "llama2-70b",
    reference: str = "a100-80gb",
) -> PlanSetup:
    """A PlanSetup for the model (TP8) on the profile table under the named setting.

    `reference` is the machine whose uncontended latencies define the slowdowns: a DGX-A100 for
    every design in SplitwiseSim's notebooks (`normalize_hardware`); another machine only as a
    variant (measuring what an H100 reference would do to the designs that use H100s).
    """
    spec = setting_spec(name, model)
    if reference not in spec.machines:
        raise ValueError(f"reference: one of {sorted(spec.machines)}, got {reference!r}")
    perf = {
        m: TablePerfModel.from_csv(SPLITWISE_TABLE, model, m, 8, spec.decode_axis)
        for m in spec.machines
    }
    chunk = spec.limits.max_num_batched_tokens
    return PlanSetup(
        model=spec.model,
        machines=spec.machines,
        perf=perf,
        reference=Reference(perf[reference], chunk, paper=spec.paper_reference),
        requests=requests,
        sim=SimConfig(spec.scheduler, spec.limits, spec.layerwise_transfer),
        seed=seed,
    )
