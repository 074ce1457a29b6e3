"""The disk tier reads exactly the checkpoint's expert weights, with either reader."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import runner

from batonserve.workers.expert_store import ExpertKey
from batonserve.workers.expert_store.disk import DiskTier


@pytest.mark.parametrize("reader", ["pread", "safe_open"])
@pytest.mark.parametrize("drop", [False, True])
def test_disk_reads_match_loaded_model(reader: str, drop: bool) -> None:
    """Every expert read from disk equals the loader's stacked weights."""
    r = runner()
    disk = DiskTier(r.model_dir, "float16", drop_page_cache=drop, reader=reader)
    disk.drop_all()
    for layer in (0, 3):
        moe = r.model.layers[layer].mlp
        for e in (0, 7, 15):
            w = disk.read(ExpertKey(layer, e))
            assert torch.equal(w.w_gate_up, moe.w_gate_up[e])
            assert torch.equal(w.w_down, moe.w_down[e])
    assert disk.reads == 6 and disk.bytes_read == 6 * w.nbytes
    disk.close()


def test_disk_errors_name_the_field() -> None:
    """Bad reader / missing expert are clear errors."""
    r = runner()
    with pytest.raises(ValueError, match="reader"):
        DiskTier(r.model_dir, "float16", reader="mmap")
    disk = DiskTier(r.model_dir, "float16")
    with pytest.raises(KeyError, match="expert"):
        disk.read(ExpertKey(0, 99))
    disk.close()
