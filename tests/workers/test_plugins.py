"""Every plug-in kind uses the one Registry: each entry resolves, names list without torch, and an
unknown name fails naming the setting and the known names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from batonserve.cluster.scheduling.policies import POLICIES as PAIRING_POLICIES
from batonserve.cluster.scheduling.policies import PairingPolicy
from batonserve.cluster.schema import ConfigError
from batonserve.workers.expert_store.policies import POLICIES as CACHE_POLICIES
from batonserve.workers.expert_store.policies import CachePolicy
from batonserve.workers.kv_transfer import TRANSPORTS, KVTransport
from batonserve.workers.models.llama import LlamaForCausalLM
from batonserve.workers.models.registry import ARCHITECTURES
from batonserve.workers.parallel.schedules import SCHEDULES, Schedule
from batonserve.workers.plugins import Registry

KINDS = [
    (PAIRING_POLICIES, PairingPolicy),
    (TRANSPORTS, KVTransport),
    (CACHE_POLICIES, CachePolicy),
    (SCHEDULES, Schedule),
    (ARCHITECTURES, LlamaForCausalLM),
]


@pytest.mark.parametrize(("registry", "base"), KINDS, ids=lambda x: getattr(x, "kind", ""))
def test_every_entry_resolves_to_a_plugin_of_its_kind(registry: Registry, base: type) -> None:
    assert registry.names()
    for name in registry:
        assert issubclass(registry.get(name), base), name


def test_unknown_names_fail_with_the_setting_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"scheduler\.policy: unknown pairing policy 'x'.*jsq"):
        PAIRING_POLICIES.get("x")
    with pytest.raises(ValueError, match=r"kv_transfer\.transport: .*'torch_dist'"):
        TRANSPORTS.check("pigeon")


def test_entries_are_imported_on_first_use_only() -> None:
    reg: Registry[type] = Registry("codec", "codec", "json", {"decoder": "decoder:JSONDecoder"})
    assert "decoder" in reg and reg.names() == ("decoder",)
    import json.decoder

    assert reg.get("decoder") is json.decoder.JSONDecoder


def test_listing_names_and_checking_config_sections_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from batonserve.cluster.kube_schema import render\n"
        "from batonserve.cluster.scheduling import SchedulerConfig\n"
        "from batonserve.workers.config import EngineConfig\n"
        "from batonserve.workers.kv_transfer.config import KVTransferConfig\n"
        "from batonserve.workers.sp_serving.config import SequenceParallelConfig\n"
        "from batonserve.workers.models.registry import ARCHITECTURES\n"
        "from batonserve.workers.parallel.schedules import SCHEDULES\n"
        "from batonserve.workers.kv_transfer import TRANSPORTS\n"
        "from batonserve.workers.expert_store.policies import POLICIES\n"
        "render(); SchedulerConfig(policy='jsq'); KVTransferConfig(transport='object_store')\n"
        "EngineConfig(dtype='bfloat16', expert_cache_policy='lru')\n"
        "SequenceParallelConfig(schedule='tokenring')\n"
        "print(len(ARCHITECTURES.names() + SCHEDULES.names() + TRANSPORTS.names() + "
        "POLICIES.names()), 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["14", "False"]
