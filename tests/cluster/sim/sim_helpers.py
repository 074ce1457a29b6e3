"""Small simulated clusters for the simulator tests."""

from __future__ import annotations

from batonserve.cluster.scheduling import SchedulerConfig
from batonserve.cluster.sim.design import Design, PoolSpec
from batonserve.cluster.sim.hardware import DEFAULT_MACHINES, DEFAULT_MODELS, MachineSpec, ModelSpec
from batonserve.cluster.sim.perf_model import (
    SPLITWISE_TABLE,
    ConstantPerfModel,
    PerfModel,
    TablePerfModel,
)
from batonserve.cluster.sim.simulator import SimConfig, Simulator
from batonserve.cluster.sim.worker import EngineLimits

LLAMA = DEFAULT_MODELS["llama2-70b"]
TOY = ModelSpec("toy", num_layers=4, num_kv_heads=2, head_dim=8, weight_bytes=0.0)
TOY_MACHINE = MachineSpec("m", cost_per_hour=1.0, power_w=100.0, kv_capacity_tokens=100_000)


def splitwise_perf() -> dict[str, PerfModel]:
    """Llama2-70B TP8 models for the three DGX machine types."""
    return {
        m: TablePerfModel.from_csv(SPLITWISE_TABLE, "llama2-70b", m, 8) for m in DEFAULT_MACHINES
    }


def single_server(prefill_s: float, max_num_seqs: int = 1) -> Simulator:
    """One colocated machine with constant step times: a single queue with fixed service."""
    design = Design("single", (PoolSpec("mixed", "mixed", "m", 1),))
    cfg = SimConfig(
        scheduler=SchedulerConfig(conditional_disaggregation=False),
        limits=EngineLimits(max_num_seqs=max_num_seqs),
    )
    return Simulator(
        design, TOY, {"m": TOY_MACHINE}, {"m": ConstantPerfModel(prefill_s, 0.01)}, cfg
    )
