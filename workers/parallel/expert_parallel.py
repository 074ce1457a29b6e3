"""Expert parallelism (Tutel-style): experts sharded over a torch.distributed group, tokens moved
by all-to-all with uneven splits (gloo on CPU, NCCL on CUDA; gloo has all_to_all_single with split
sizes, so no point-to-point fallback is needed).

Each rank routes its own tokens, keeps the experts E/W*r .. E/W*(r+1)-1 as a slice of the
checkpoint's stacked layout, and per forward: all-gathers its routing counts (plus its previous
forward's time, for the tuner), derives the round schedule (ep_schedule), and pipelines the rounds:
dispatch of round i+1 and combine of round i are in flight while round i's experts compute. The
overlap degree and capacity factor are per-forward arguments (or the tuner's pick) and cost nothing
to change. No token copy is ever dropped: capacity overflow runs in extra rounds.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from batonserve.kernels.moe import permute_by_expert, topk_routing, unpermute_combine
from batonserve.kernels.moe_experts import swiglu_experts
from batonserve.workers.parallel.ep_schedule import EPShape, RoundPlan, plan_rounds
from batonserve.workers.parallel.ep_tuner import EPSettings, EPTuner


class ExpertParallelMoE(nn.Module):
    """A Mixtral MoE block whose experts are sharded over an expert-parallel group."""

    def __init__(
        self,
        gate: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        top_k: int,
        group: dist.ProcessGroup | None = None,
        tuner: EPTuner | None = None,
        settings: EPSettings | None = None,
        *,
        renormalize: bool = True,
        shared: nn.Module | None = None,
    ) -> None:
        """gate [E, D]; w_gate_up [E, 2I, D] and w_down [E, D, I] (all experts; this rank keeps its slice).

        `renormalize`: the top-k weights sum to 1 (Mixtral; Qwen2-MoE's `norm_topk_prob`).
        `shared`: an always-on expert (Qwen2-MoE's gated shared expert), replicated on every rank
        and applied to this rank's own tokens, added after the routed experts as the model does.
        """
        super().__init__()
        self.group = group
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.shape = EPShape(world, rank, int(gate.shape[0]))
        mine = self.shape.experts_of(rank)
        self.gate = nn.Parameter(gate, requires_grad=False)
        # This rank's experts only: a contiguous slice of the stacked layout [E/W, ...].
        self.w_gate_up = nn.Parameter(
            w_gate_up[mine.start : mine.stop].clone(), requires_grad=False
        )
        self.w_down = nn.Parameter(w_down[mine.start : mine.stop].clone(), requires_grad=False)
        self.top_k = top_k
        self.renormalize = renormalize
        self.shared = shared
        self.tuner = tuner
        self.settings = settings or EPSettings()
        self.last_settings = self.settings
        self._prev_ns = 0  # this rank's previous forward time, sent with the next counts
        self._prev_tuned = False

    def forward(self, x: torch.Tensor, settings: EPSettings | None = None) -> torch.Tensor:
        """x [T, D] (this rank's tokens) -> [T, D]."""
        t0 = time.perf_counter_ns()
        e_total = self.shape.num_experts
        logits = F.linear(x, self.gate)  # [T, E]
        weights, ids = topk_routing(logits, self.top_k, renormalize=self.renormalize)  # [T, k]
        permuted, perm = permute_by_expert(x, ids, e_total)  # [T*k, D] sorted by expert
        counts, prev_ns = self._exchange_counts(perm.counts)  # [W, E], [W]
        tuned = settings is None and self.tuner is not None
        if tuned:
            assert self.tuner is not None
            if self._prev_tuned and int(prev_ns.max()) > 0:
                self.tuner.observe(int(prev_ns.max()) / 1e9)
            settings = self.tuner.choose(int(counts.sum()) // self.top_k)
        self._prev_tuned = tuned  # only a tuner-chosen forward's time is fed back to the tuner
        settings = settings or self.settings
        self.last_settings = settings
        rounds = plan_rounds(self.shape, counts, settings.overlap, settings.capacity_factor)
        out = self._run(permuted, rounds)
        result = unpermute_combine(out, perm, weights)
        if self.shared is not None:
            result = result + self.shared(x)
        self._prev_ns = time.perf_counter_ns() - t0
        return result

    def _exchange_counts(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather [E] counts + previous time: -> counts [W, E], times [W] (ns)."""
        mine = torch.cat([local.to(torch.int64).cpu(), torch.tensor([self._prev_ns])])
        if self.shape.world_size == 1:
            return mine[None, :-1], mine[-1:]
        if mine.device != x_device(self):
            mine = mine.to(x_device(self))
        parts = [torch.empty_like(mine) for _ in range(self.shape.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        allc = torch.stack(parts).cpu()  # [W, E + 1]
        return allc[:, :-1], allc[:, -1]

    def _experts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(w_gate_up [2I, D], w_down [D, I]) of each local expert."""
        return [(self.w_gate_up[i], self.w_down[i]) for i in range(self.shape.per_rank)]

    def _a2a(
        self, src: torch.Tensor, out_rows: int, out_splits: list[int], in_splits: list[int]
    ) -> tuple[torch.Tensor, dist.Work | None]:
        """Async all-to-all of rows with uneven splits (a copy when the group has one rank)."""
        if self.shape.world_size == 1:
            return src, None
        dst = src.new_empty(out_rows, src.shape[1])
        work = dist.all_to_all_single(
            dst, src.contiguous(), out_splits, in_splits, group=self.group, async_op=True
        )
        return dst, work

    def _run(self, permuted: torch.Tensor, rounds: list[RoundPlan]) -> torch.Tensor:
        """Pipeline the rounds: dispatch i+1 and combine i overlap the experts of round i."""
        experts = self._experts()
        out = torch.empty_like(permuted)  # [T*k, D]

        def dispatch(r: RoundPlan) -> tuple[torch.Tensor, dist.Work | None]:
            return self._a2a(
                permuted[r.send_index], sum(r.recv_counts), r.recv_counts, r.send_counts
            )

        pending = dispatch(rounds[0])
        combines: list[tuple[RoundPlan, torch.Tensor, dist.Work | None]] = []
        for i, r in enumerate(rounds):
            recv, work = pending
            if work is not None:
                work.wait()
            if i + 1 < len(rounds):
                pending = dispatch(rounds[i + 1])
            xe = recv[r.recv_to_expert]  # [n_recv, D] expert-major
            ye = swiglu_experts(xe, r.expert_counts, experts)
            back = torch.empty_like(ye)
            back[r.recv_to_expert] = ye  # src-major again, as received
            res, cwork = self._a2a(back, int(r.send_index.numel()), r.send_counts, r.recv_counts)
            combines.append((r, res, cwork))
        for r, res, cwork in combines:
            if cwork is not None:
                cwork.wait()
            out[r.send_index] = res
        return out


def expert_parallel_of(
    moe: nn.Module,
    group: dist.ProcessGroup | None = None,
    tuner: EPTuner | None = None,
    settings: EPSettings | None = None,
) -> ExpertParallelMoE:
    """This rank's expert-parallel shard of a loaded SparseMoE block (Mixtral, or Qwen2-MoE with
    its routing renormalisation flag and shared expert)."""
    block: Any = moe  # either block class: the same attribute names, no common base
    return ExpertParallelMoE(
        block.gate.data,
        block.w_gate_up.data,
        block.w_down.data,
        block.top_k,
        group,
        tuner,
        settings,
        renormalize=getattr(block, "renormalize", True),  # only Qwen2MoE has these two
        shared=getattr(block, "shared", None),
    )


def x_device(module: ExpertParallelMoE) -> torch.device:
    """The device collectives of this module run on (NCCL needs CUDA tensors)."""
    return module.gate.device


def attach_expert_parallel(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    tuner: EPTuner | None = None,
    settings: EPSettings | None = None,
) -> list[ExpertParallelMoE]:
    """Swap every SparseMoE of a loaded model for its expert-parallel shard on this rank.

    Every rank of the group must run its forwards in lockstep (same number of forwards), each with
    its own tokens; attention stays local (data parallel), only the experts are sharded.
    """
    from batonserve.workers.models.layers import SparseMoE

    blocks: list[ExpertParallelMoE] = []
    for layer in model.layers:  # type: ignore[union-attr]
        moe = layer.mlp
        if not isinstance(moe, SparseMoE):
            continue
        ep = expert_parallel_of(moe, group, tuner, settings)
        layer.mlp = ep
        blocks.append(ep)
    if not blocks:
        raise ValueError("model: no sparse MoE layers to shard")
    return blocks
