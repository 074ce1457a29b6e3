"""Cases, float64 reference and per-rank runners for the sequence-parallel attention tests."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from batonserve.workers.parallel import (
    AttentionDims,
    RankShard,
    SPCommError,
    SPGroup,
    bytes_sent_per_step,
    plan_sp_attention,
    shard_batch,
    sp_attention,
)

SCHEDULE_NAMES = ("ring", "tokenring", "allgather")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


@dataclass(frozen=True)
class Case:
    """One batch: request lengths, heads, dtype, layout, prefix placement."""

    name: str
    new_lens: tuple[int, ...]
    cached_lens: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int = 8
    dtype: str = "float32"
    layout: str = "zigzag"
    prefix: str = "spread"
    seed: int = 0


def cases() -> list[Case]:
    """Every case each group size runs (identical list and order on every rank)."""
    out: list[Case] = []
    for layout in ("zigzag", "striped", "contiguous"):
        out.append(Case(f"varlen-{layout}", (37, 5, 1), (0, 0, 0), 4, 2, layout=layout, seed=1))
    for kv in (1, 2, 4):
        out.append(Case(f"gqa{kv}-prefix", (29,), (11,), 4, kv, seed=2 + kv))
    out.append(Case("odd-2999", (2999,), (0,), 2, 1, seed=7))
    out.append(Case("below-n", (1, 2, 3), (0, 0, 0), 2, 2, seed=8))
    out.append(Case("prefix-rank0", (13, 6), (20, 7), 4, 2, prefix="rank0", seed=9))
    out.append(Case("prefix-striped", (13, 1), (20, 0), 4, 1, layout="striped", seed=10))
    out.append(Case("bf16", (41, 9), (0, 5), 4, 2, dtype="bfloat16", seed=11))
    out.append(Case("bf16-mha", (23,), (9,), 2, 2, dtype="bfloat16", layout="striped", seed=12))
    return out


def make_inputs(c: Case) -> tuple[torch.Tensor, ...]:
    """Global float64 inputs, rounded through the case dtype: q, k_new, v_new, k_pre, v_pre."""
    g = torch.Generator().manual_seed(c.seed)
    dt = getattr(torch, c.dtype)
    tn, tp = sum(c.new_lens), sum(c.cached_lens)
    shapes = [(tn, c.heads), (tn, c.kv_heads), (tn, c.kv_heads), (tp, c.kv_heads), (tp, c.kv_heads)]
    return tuple(
        torch.randn(n, h, c.head_dim, generator=g, dtype=torch.float64).to(dt).double()
        for n, h in shapes
    )


def reference(
    c: Case, xs: tuple[torch.Tensor, ...], rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 causal attention (prefix included) of the new-token `rows`: (out [n, H, d], lse [n, H])."""
    q, kn, vn, kp, vp = xs
    g = c.heads // c.kv_heads
    out = torch.zeros(rows.numel(), c.heads, c.head_dim, dtype=torch.float64)
    lse = torch.zeros(rows.numel(), c.heads, dtype=torch.float64)
    no = po = 0
    for n, p in zip(c.new_lens, c.cached_lens, strict=True):
        sel = torch.nonzero((rows >= no) & (rows < no + n)).flatten()  # this request's rows
        if sel.numel():
            i = rows[sel] - no  # [m] index among the request's new tokens
            k = torch.cat([kp[po : po + p], kn[no : no + n]]).repeat_interleave(g, dim=1)
            v = torch.cat([vp[po : po + p], vn[no : no + n]]).repeat_interleave(g, dim=1)
            s = torch.einsum("qhd,khd->hqk", q[no + i], k) / math.sqrt(c.head_dim)
            allowed = torch.arange(p + n)[None, :] <= (p + i)[:, None]  # bottom-right causal
            s = s.masked_fill(~allowed[None], float("-inf"))
            lse[sel] = torch.logsumexp(s, dim=-1).T
            out[sel] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
        no += n
        po += p
    return out, lse


def run_case(c: Case, g: SPGroup) -> list[dict[str, Any]]:
    """Run one case under every schedule on this rank; compare each to the float64 reference."""
    xs = make_inputs(c)
    dt = getattr(torch, c.dtype)
    sh = shard_batch(
        list(c.new_lens),
        list(c.cached_lens),
        g.world_size,
        g.rank,
        layout=c.layout,
        prefix_placement=c.prefix,
    )
    want_out, want_lse = reference(c, xs, sh.new_rows)
    q, kn, vn, kp, vp = (x.to(dt) for x in xs)
    k = torch.cat([kp[sh.prefix_rows], kn[sh.new_rows]])  # prefix rows first, then new rows
    v = torch.cat([vp[sh.prefix_rows], vn[sh.new_rows]])
    dims = AttentionDims(c.heads, c.kv_heads, c.head_dim, q.element_size())
    return [_run_schedule(c, g, s, sh, (q, k, v), dims, want_out, want_lse) for s in SCHEDULE_NAMES]


def _run_schedule(
    c: Case,
    g: SPGroup,
    schedule: str,
    sh: RankShard,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    dims: AttentionDims,
    want_out: torch.Tensor,
    want_lse: torch.Tensor,
) -> dict[str, Any]:
    """One schedule on one case: errors, bytes per step (measured and formula), outputs."""
    q, k, v = qkv
    plan = plan_sp_attention(sh.spec, g, dims, schedule=schedule)
    res = sp_attention(q[sh.new_rows], k, v, plan, g)
    measured = [s.bytes_sent for s in res.metrics.steps]
    formula = [
        b.total for b in bytes_sent_per_step(schedule, plan.meta.n_q, plan.meta.n_kv, g.rank, dims)
    ]
    return {
        "case": c.name,
        "schedule": schedule,
        "dtype": c.dtype,
        "out_err": float((res.out.double() - want_out).abs().max()) if sh.spec.num_q else 0.0,
        "lse_err": float((res.lse.double() - want_lse).abs().max()) if sh.spec.num_q else 0.0,
        "nan": bool(torch.isnan(res.out).any() or torch.isnan(res.lse).any()),
        "out_dtype": str(res.out.dtype),
        "bytes_measured": measured,
        "bytes_formula": formula,
        "rows": sh.new_rows.tolist(),
        "out": res.out.double().flatten().tolist() if c.name != "odd-2999" else [],
        "hidden": [s.hidden_fraction for s in res.metrics.steps],
    }


def rank_all_cases(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """Every case under every schedule on one process group (reused across cases), then the
    cost model's own pick (schedule=None) and a shape error."""
    g = SPGroup(timeout_s=30.0)
    results = [r for c in cases() for r in run_case(c, g)]
    sh = shard_batch([40], [300], world, rank)
    dims = AttentionDims(4, 4, 8, 4)
    plan = plan_sp_attention(sh.spec, g, dims)  # the cost model picks, from group-wide counts
    q = torch.randn(sh.spec.num_q, 4, 8)
    kv = torch.randn(sh.spec.num_kv, 4, 8)
    try:
        sp_attention(q[:, :2], kv, kv, plan, g)
        shape_error = ""
    except ValueError as e:
        shape_error = str(e)
    picked_out = sp_attention(q, kv, kv, plan, g).out
    return {
        "cases": results,
        "picked": plan.schedule,
        "picked_finite": bool(torch.isfinite(picked_out).all()),
        "shape_error": shape_error,
    }


def rank_killed_peer(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    """The last rank dies after planning; the others must get SPCommError in bounded time."""
    g = SPGroup(timeout_s=5.0)
    c = Case("kill", (64,), (0,), 2, 1)
    sh = shard_batch([64], None, world, rank)
    q, kn, vn, _, _ = (x.float() for x in make_inputs(c))
    schedule = "ring" if (tmp / "ring").exists() else "tokenring"
    dims = AttentionDims(2, 1, 8, 4)
    plan = plan_sp_attention(sh.spec, g, dims, schedule=schedule)
    if rank == world - 1:
        import os

        os._exit(0)  # a rank that dies mid-request
    t0 = time.monotonic()
    try:
        sp_attention(q[sh.new_rows], kn[sh.new_rows], vn[sh.new_rows], plan, g)
        # A surviving rank may finish its own sends before noticing; the next call must fail.
        sp_attention(q[sh.new_rows], kn[sh.new_rows], vn[sh.new_rows], plan, g)
    except SPCommError as e:
        return {"error": str(e), "elapsed": time.monotonic() - t0}
    return {"error": "", "elapsed": time.monotonic() - t0}


def case_dicts() -> list[dict[str, Any]]:
    """The case list as plain dicts (for test ids)."""
    return [asdict(c) for c in cases()]
