"""Sequence-parallel attention entry point: this rank's q/k/v in, this rank's output (and LSE) out.

Per forward (collective, once, shared by every layer):
    plan = plan_sp_attention(shard.spec, group, dims, schedule=None)   # None: the cost model picks
Per layer (collective):
    res = sp_attention(q, k, v, plan, group)   # res.out [n_q, H, d], res.lse [n_q, H] f32

q holds this rank's new tokens [n_q, H, d]; k/v every KV row the rank holds [n_kv, Hkv, d] in the
order of `ShardSpec.kv_pos` (see `layout.shard_batch`: prefix rows first, then new rows).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from batonserve.kernels.ring import DEFAULT_TILE, BlockPlan
from batonserve.workers.parallel.comm import SPGroup, all_gather_padded
from batonserve.workers.parallel.cost_model import HardwareModel, SPShape, choose_schedule
from batonserve.workers.parallel.layout import ShardSpec
from batonserve.workers.parallel.metrics import SPMetrics
from batonserve.workers.parallel.schedules import AttentionDims, GroupMeta, get_schedule


@dataclass(frozen=True)
class SPAttentionPlan:
    """Everything a layer's call needs that depends only on token positions."""

    schedule: str
    dims: AttentionDims
    meta: GroupMeta
    blocks: tuple[BlockPlan, ...]  # this rank's local block plan per step
    rank: int
    world_size: int


@dataclass(frozen=True)
class SPAttentionOutput:
    """This rank's attention output, its LSE, and the call's metrics."""

    out: torch.Tensor  # [n_q, H, d] in q's dtype
    lse: torch.Tensor  # [n_q, H] float32, -inf for a row that saw no key
    metrics: SPMetrics


def exchange_meta(spec: ShardSpec, g: SPGroup) -> GroupMeta:
    """All-gather every rank's positions (collective; int64 metadata only)."""
    if g.world_size == 1:
        return GroupMeta((spec,))
    counts = torch.tensor([[spec.num_q, spec.num_kv]], dtype=torch.long, device=g.device)
    all_counts = all_gather_padded(g, counts, [1] * g.world_size, "metadata exchange", None)
    sizes = [(int(c[0, 0]), int(c[0, 1])) for c in all_counts]
    flat = torch.cat([spec.q_pos, spec.q_seq, spec.kv_pos, spec.kv_seq]).long().to(g.device)
    parts = all_gather_padded(g, flat, [2 * a + 2 * b for a, b in sizes], "metadata exchange", None)
    shards = []
    for (nq, nkv), p in zip(sizes, parts, strict=True):
        q_pos, q_seq, kv_pos, kv_seq = p.split([nq, nq, nkv, nkv])
        shards.append(ShardSpec(q_pos.cpu(), q_seq.cpu(), kv_pos.cpu(), kv_seq.cpu()))
    return GroupMeta(tuple(shards))


def plan_sp_attention(
    spec: ShardSpec,
    g: SPGroup,
    dims: AttentionDims,
    *,
    schedule: str | None = None,
    hardware: HardwareModel | None = None,
    tile: int = DEFAULT_TILE,
) -> SPAttentionPlan:
    """Exchange positions and build this rank's per-step block plans (collective, once per forward).

    With `schedule=None` the cost model picks from the whole group's token counts, so every rank
    picks the same one.
    """
    meta = exchange_meta(spec, g)
    if schedule is None:
        new = sum(meta.n_q)
        shape = SPShape(
            dims.num_heads,
            dims.num_kv_heads,
            dims.head_dim,
            new,
            sum(meta.n_kv) - new,
            g.world_size,
            dims.elem_bytes,
        )
        schedule = choose_schedule(shape, hardware)
    blocks = get_schedule(schedule).plan_blocks(meta, g.rank, tile)
    return SPAttentionPlan(schedule, dims, meta, blocks, g.rank, g.world_size)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SPAttentionPlan) -> None:
    """Raise ValueError naming the tensor whose shape does not match the plan."""
    d = plan.dims
    mine = plan.meta.shards[plan.rank]
    want_q = (mine.num_q, d.num_heads, d.head_dim)
    want_kv = (mine.num_kv, d.num_kv_heads, d.head_dim)
    if tuple(q.shape) != want_q:
        raise ValueError(f"q has shape {tuple(q.shape)}, the plan expects {want_q}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want_kv:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, the plan expects {want_kv}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, q has {q.dtype}")


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SPAttentionPlan,
    g: SPGroup,
    *,
    scale: float | None = None,
) -> SPAttentionOutput:
    """Causal attention of this rank's queries over every rank's keys (collective, once per layer)."""
    _check(q, k, v, plan)
    scale = 1.0 / math.sqrt(plan.dims.head_dim) if scale is None else scale
    t0 = time.perf_counter()
    res = get_schedule(plan.schedule).run(
        q.contiguous(), k.contiguous(), v.contiguous(), plan.blocks, plan.meta, g, scale
    )
    total = time.perf_counter() - t0
    metrics = SPMetrics(plan.schedule, g.world_size, g.rank, res.steps, total)
    return SPAttentionOutput(res.out, res.lse, metrics)
