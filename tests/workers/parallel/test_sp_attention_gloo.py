"""Sequence-parallel attention on N real gloo ranks vs a float64 reference (one spawn per N)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sp_cases import SCHEDULE_NAMES, TOL, cases, rank_all_cases, rank_killed_peer
from testkit.gloo_ranks import spawn_ranks


def _by_case(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(case, schedule) -> every rank's result."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    assert all(rec["ok"] for rec in records), [rec.get("error") for rec in records]
    for rec in records:
        for r in rec["result"]["cases"]:
            out.setdefault((r["case"], r["schedule"]), []).append(r)
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_reference_all_schedules_and_layouts(world: int, tmp_path: Path) -> None:
    """Every case x schedule: within tolerance of float64, no NaN, formula bytes, schedules agree."""
    records = spawn_ranks(rank_all_cases, world, tmp_path, tmp_path, deadline_s=300)
    results = _by_case(records)
    # schedule=None: the cost model picks, the same on every rank; bad shapes name the tensor.
    picks = {rec["result"]["picked"] for rec in records}
    assert len(picks) == 1 and picks <= set(SCHEDULE_NAMES), picks
    for rec in records:
        assert rec["result"]["picked_finite"]
        assert rec["result"]["shape_error"].startswith("q has shape"), rec["result"]["shape_error"]
    assert len(results) == len(cases()) * len(SCHEDULE_NAMES)
    for c in cases():
        merged: dict[str, torch.Tensor] = {}
        for s in SCHEDULE_NAMES:
            per_rank = results[(c.name, s)]
            assert len(per_rank) == world
            for r in per_rank:
                tag = f"{c.name}/{s} N={world}"
                assert not r["nan"], tag
                assert r["out_dtype"] == f"torch.{c.dtype}", tag
                assert r["out_err"] <= TOL[c.dtype], (tag, r["out_err"])
                assert r["lse_err"] <= 1e-4, (tag, r["lse_err"])
                assert r["bytes_measured"] == r["bytes_formula"], tag
                if world > 1 and s != "allgather":
                    assert len(r["bytes_measured"]) == world, tag
                    assert all(0.0 <= h <= 1.0 for h in r["hidden"]), tag
            if c.name == "odd-2999":
                continue
            # Reassemble the full output from the ranks' rows: every token exactly once.
            rows = torch.tensor([i for r in per_rank for i in r["rows"]], dtype=torch.long)
            assert sorted(rows.tolist()) == list(range(sum(c.new_lens))), c.name
            vals = torch.tensor([x for r in per_rank for x in r["out"]], dtype=torch.float64)
            full = torch.empty(rows.numel(), c.heads * c.head_dim, dtype=torch.float64)
            full[rows] = vals.view(rows.numel(), -1)
            merged[s] = full
        if merged:
            for s in SCHEDULE_NAMES[1:]:
                diff = float((merged[s] - merged["ring"]).abs().max()) if merged[s].numel() else 0
                assert diff <= TOL[c.dtype], (c.name, s, diff)


@pytest.mark.parametrize("schedule", ["ring", "tokenring"])
def test_killed_peer_gives_bounded_error(schedule: str, tmp_path: Path) -> None:
    """A rank that dies mid-request: survivors raise SPCommError naming the step, well before a hang."""
    (tmp_path / schedule).touch()
    recs = spawn_ranks(rank_killed_peer, 3, tmp_path, tmp_path, timeout_s=5.0, deadline_s=90)
    survivors = recs[:2]
    for rec in survivors:
        assert rec["ok"], rec.get("error")
        err = rec["result"]["error"]
        assert err, "a survivor finished without noticing the dead peer"
        assert f"{schedule} step" in err, err
        assert rec["result"]["elapsed"] < 30.0
