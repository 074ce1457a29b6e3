"""Cluster designs: pools of machines, as Splitwise names them (Splitwise-AA/-HH/-HA/-HHcap, baselines)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from batonserve.cluster.scheduling import Role
from batonserve.cluster.sim.hardware import MachineSpec


@dataclass(frozen=True)
class PoolSpec:
    """`replicas` machines of one type sharing a role.

    `tensor_parallel`: GPUs per worker (0: the model's default, a whole DGX at TP8); a machine
    of 8 GPUs runs 8 / tensor_parallel workers, each with its share of memory and links.
    """

    name: str
    role: Role
    machine: str
    replicas: int
    tensor_parallel: int = 0

    def __post_init__(self) -> None:
        if self.tensor_parallel < 0:
            raise ValueError(f"pool {self.name}: tensor_parallel must be >= 0")


def perf_key(machine: str, tensor_parallel: int, default_tp: int) -> str:
    """The key of a machine's performance model at a TP degree ('a100-80gb', 'a100-80gb/tp4')."""
    if tensor_parallel in (0, default_tp):
        return machine
    return f"{machine}/tp{tensor_parallel}"


@dataclass(frozen=True)
class Family:
    """A design family: which machine serves prompts and which serves tokens (same = colocated)."""

    name: str
    prefill_machine: str
    decode_machine: str
    colocated: bool  # a baseline: every machine runs both phases (one "mixed" pool)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("Splitwise-AA", "a100-80gb", "a100-80gb", False),
        Family("Splitwise-HH", "h100-80gb", "h100-80gb", False),
        Family("Splitwise-HA", "h100-80gb", "a100-80gb", False),
        Family("Splitwise-HHcap", "h100-80gb", "h100-80gb-pcap", False),
        Family("Baseline-A", "a100-80gb", "a100-80gb", True),
        Family("Baseline-H", "h100-80gb", "h100-80gb", True),
    )
}

SPLITWISE_FAMILIES = tuple(FAMILIES)  # the paper's six, before any register_family


@dataclass(frozen=True)
class Design:
    """One candidate cluster."""

    family: str
    pools: tuple[PoolSpec, ...]

    @property
    def num_prefill(self) -> int:
        """Machines in prefill pools."""
        return sum(p.replicas for p in self.pools if p.role == "prefill")

    @property
    def num_decode(self) -> int:
        """Machines in decode pools."""
        return sum(p.replicas for p in self.pools if p.role == "decode")

    @property
    def num_machines(self) -> int:
        """All machines."""
        return sum(p.replicas for p in self.pools)

    @property
    def label(self) -> str:
        """Short name, e.g. 'Splitwise-HA 3P+2D', 'Baseline-A 5' or 'Splitwise-AA 3P+2D TP4/8'."""
        if self.num_prefill or self.num_decode:
            text = f"{self.family} {self.num_prefill}P+{self.num_decode}D"
        else:
            text = f"{self.family} {self.num_machines}"
        tps = [p.tensor_parallel for p in self.pools]
        if any(tps):
            text += " TP" + "/".join(str(t or "-") for t in tps)
        return text

    def cost_per_hour(self, machines: Mapping[str, MachineSpec]) -> float:
        """Dollars per hour for every machine."""
        return sum(machines[p.machine].cost_per_hour * p.replicas for p in self.pools)

    def power_w(self, machines: Mapping[str, MachineSpec]) -> float:
        """Provisioned power of every machine."""
        return sum(machines[p.machine].power_w * p.replicas for p in self.pools)


def register_family(family: Family) -> Family:
    """Add a family (e.g. for machines of a profiled table); an existing name is an error."""
    if family.name in FAMILIES and FAMILIES[family.name] != family:
        raise ValueError(f"design family {family.name!r} already exists with other machines")
    FAMILIES[family.name] = family
    return family


def families_for(hardware: list[str]) -> list[str]:
    """Splitwise's six families when the table has A100 and H100 rows, else one per machine."""
    builtin = [FAMILIES[n] for n in SPLITWISE_FAMILIES]
    if all(m in hardware for f in builtin for m in (f.prefill_machine, f.decode_machine)):
        return list(SPLITWISE_FAMILIES)
    names = []
    for hw in hardware:
        names.append(register_family(Family(f"Splitwise-{hw}", hw, hw, False)).name)
        names.append(register_family(Family(f"Baseline-{hw}", hw, hw, True)).name)
    return names


def make_design(
    family: str,
    num_prefill: int,
    num_decode: int = 0,
    prefill_tp: int = 0,
    decode_tp: int = 0,
) -> Design:
    """A design of a family: colocated families take the total in `num_prefill` (and its TP)."""
    fam = FAMILIES.get(family)
    if fam is None:
        raise ValueError(f"unknown design family {family!r}; choose from {sorted(FAMILIES)}")
    if fam.colocated:
        n = num_prefill + num_decode
        if n < 1:
            raise ValueError(f"{family}: need at least one machine")
        return Design(family, (PoolSpec("mixed", "mixed", fam.prefill_machine, n, prefill_tp),))
    if num_prefill < 1 or num_decode < 1:
        raise ValueError(f"{family}: need at least one prefill and one decode machine")
    return Design(
        family,
        (
            PoolSpec("prefill", "prefill", fam.prefill_machine, num_prefill, prefill_tp),
            PoolSpec("decode", "decode", fam.decode_machine, num_decode, decode_tp),
        ),
    )


def with_tensor_parallel(design: Design, prefill_tp: int, decode_tp: int) -> Design:
    """The same design with its prompt (or mixed) pools at `prefill_tp`, token pools at `decode_tp`."""
    pools = tuple(
        dataclasses.replace(p, tensor_parallel=decode_tp if p.role == "decode" else prefill_tp)
        for p in design.pools
    )
    return Design(design.family, pools)
