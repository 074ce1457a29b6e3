"""Configuration of the cluster-level scheduler: the `scheduler` section of ServeConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from batonserve.cluster.scheduling.policies import POLICIES
from batonserve.cluster.schema import ConfigError
from batonserve.workers.plugins import choices


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits that a pairing must respect; a request no pair can take is rejected at once."""

    max_pending_prefill_tokens: int = (
        0  # per prefill-capable worker, after adding the prompt; 0: no limit
    )
    max_queue_len: int = 0  # waiting requests per prefill-capable worker; 0: no limit
    kv_headroom_fraction: float = 0.0  # of a decode worker's KV kept free after the request lands
    reserve_output_tokens: int = 0  # KV reserved for generated tokens (capped at max_tokens)
    max_prompt_tokens: int = 0  # longer prompts are refused outright; 0: no limit

    def __post_init__(self) -> None:
        for name in ("max_pending_prefill_tokens", "max_queue_len", "reserve_output_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"scheduler.admission.{name}: must be >= 0")
        if self.max_prompt_tokens < 0:
            raise ConfigError("scheduler.admission.max_prompt_tokens: must be >= 0")
        if not 0.0 <= self.kv_headroom_fraction < 1.0:
            raise ConfigError(
                "scheduler.admission.kv_headroom_fraction: must be in [0, 1), "
                f"got {self.kv_headroom_fraction}"
            )


@dataclass(frozen=True)
class MixedPoolConfig:
    """Splitwise's mixed pool: borrow workers across phases under pressure, with hysteresis."""

    enabled: bool = True
    # Mean pending prefill tokens per prefill-capable worker: borrow a decode worker at or above
    # `borrow_prefill_tokens`, give it back at or below `return_prefill_tokens`.
    borrow_prefill_tokens: int = 8192
    return_prefill_tokens: int = 2048
    # KV usage over decode-capable workers: borrow a prefill worker at or above, return at or below.
    borrow_decode_kv_usage: float = 0.9
    return_decode_kv_usage: float = 0.6
    min_decode_workers: int = 1  # never lend the last decode worker(s) away
    min_prefill_workers: int = 1
    cooldown_s: float = 0.5  # minimum time between two role changes (damps flapping)

    def __post_init__(self) -> None:
        p = "scheduler.mixed_pool."
        if self.return_prefill_tokens < 0:
            raise ConfigError(f"{p}return_prefill_tokens: must be >= 0")
        if self.borrow_prefill_tokens <= self.return_prefill_tokens:
            raise ConfigError(
                f"{p}borrow_prefill_tokens: must be above return_prefill_tokens "
                f"({self.borrow_prefill_tokens} <= {self.return_prefill_tokens})"
            )
        if not 0.0 <= self.return_decode_kv_usage < self.borrow_decode_kv_usage <= 1.0:
            raise ConfigError(
                f"{p}borrow_decode_kv_usage: need 0 <= return_decode_kv_usage < "
                f"borrow_decode_kv_usage <= 1, got {self.return_decode_kv_usage} and "
                f"{self.borrow_decode_kv_usage}"
            )
        for name in ("min_decode_workers", "min_prefill_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{p}{name}: must be >= 0")
        if self.cooldown_s < 0:
            raise ConfigError(f"{p}cooldown_s: must be >= 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """The cluster-level scheduler: pairing policy, conditional disaggregation, mixed pool, admission."""

    policy: str = field(default="splitwise", metadata=choices(POLICIES.names()))
    conditional_disaggregation: bool = True
    # A prompt whose uncached part is at most this many tokens is prefilled in place on a decode
    # worker (a short prompt, or a long one whose prefix that worker already caches).
    in_place_max_tokens: int = 256
    mixed_pool: MixedPoolConfig = field(default_factory=MixedPoolConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)

    def __post_init__(self) -> None:
        POLICIES.check(self.policy)
        if self.in_place_max_tokens < 0:
            raise ConfigError(
                f"scheduler.in_place_max_tokens: must be >= 0, got {self.in_place_max_tokens}"
            )
