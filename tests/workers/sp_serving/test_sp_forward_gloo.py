"""The SP model forward over 2-3 gloo processes equals the single-process forward: every rank's K/V
rows (all layers, in its paged blocks) and the last-token logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from sp_forward_ranks import run_rank


@pytest.mark.parametrize(
    ("world", "length", "layout", "schedule"),
    [(2, 37, "zigzag", None), (3, 50, "striped", "tokenring")],
)
def test_sp_forward_matches_single_process(
    tiny_model: Callable[[str], Path],
    tmp_path: Path,
    world: int,
    length: int,
    layout: str,
    schedule: str | None,
) -> None:
    model = tiny_model("llama")
    mp.spawn(
        run_rank,
        args=(world, str(model), str(tmp_path), length, layout, schedule),
        nprocs=world,
        join=True,
    )
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert sum(r["has_last"] for r in recs) == 1  # exactly one rank samples the first token
    assert len({r["schedule"] for r in recs}) == 1  # every rank ran the same schedule
    if schedule is not None:
        assert recs[0]["schedule"] == schedule
