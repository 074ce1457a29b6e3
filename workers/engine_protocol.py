"""What a worker drives: the one seam between a worker and its engine core.

`EngineCore` (the real model) and `ScriptedEngine` (scripted tokens, no model math) both implement
`WorkerEngine`, so the worker, its KV exporter/importer and the tests drive either through the
same typed calls: token ids in, `CoreOutput`s out, KV read and written by layer at cache slots.
Text (tokenizer, stop strings) never crosses this seam: it lives in the router process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from batonserve.workers.block_pool import BlockPool
from batonserve.workers.kv_transfer.base import KVSpec
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import Scheduler, SchedulerStats, StepPlan

# Called once layer `i`'s KV of a step is in the cache, with that step's plan (positions and
# block tables of every request in it), so a transport can move layer i while i + 1 computes.
LayerHook = Callable[[int, StepPlan], None]


@runtime_checkable
class WorkerEngine(Protocol):
    """An engine core as a worker drives it (see module docstring)."""

    kv_spec: KVSpec  # what must match a peer's engine for KV handoff
    device: torch.device  # where the KV cache lives
    scheduler: Scheduler  # read for stats and pinned requests; driven only through the methods
    pool: BlockPool  # read for free blocks and cached prefix hashes

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Check and queue a request (ValueError names what is wrong); prefill_only pins its
        KV after the first token until `release`."""
        ...

    def abort_request(self, request_id: str) -> bool:
        """End a request wherever it is and free its blocks; False if unknown (idempotent)."""
        ...

    def release(self, request_id: str) -> bool:
        """Free a prefilled request's pinned blocks (its KV was handed off); False if unknown."""
        ...

    def has_unfinished(self) -> bool:
        """True while a request waits or runs (pinned and importing ones do not count)."""
        ...

    def stats(self) -> SchedulerStats:
        """Scheduler, KV-cache and (when served from a store) expert figures."""
        ...

    def step(self, layer_hook: LayerHook | None = None) -> list[CoreOutput]:
        """Schedule, run every layer (calling `layer_hook` after each), sample, update."""
        ...

    def kv_slots(self, request_id: str) -> torch.Tensor:
        """int64 [prompt_len] cache slots of a prefilled or running request's prompt."""
        ...

    def import_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_token_id: int,
        params: SamplingParams,
    ) -> torch.Tensor:
        """Reserve blocks for a request prefilled elsewhere; int64 [prompt_len] slots to fill."""
        ...

    def commit_import(self, request_id: str) -> None:
        """Every layer of an imported request is written: decode it from its next token on."""
        ...

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) at slots, each [len(slots), num_kv_heads, head_dim]."""
        ...

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (k, v), each [len(slots), num_kv_heads, head_dim], at slots."""
        ...

    def ep_tuner_stats(self) -> EPTunerStats | None:
        """The expert-parallel overlap tuner's choices when this engine leads an EP group."""
        ...
