"""The committed routing predictor: loads, matches demo-moe, forecasts better than chance."""

from __future__ import annotations

import torch
from moe_helpers import MODEL, runner

from batonserve.workers.expert_store import (
    RoutingPredictor,
    attach_resident,
    default_predictor_path,
)
from batonserve.workers.expert_store.decode import greedy_decode


def test_predictor_file_matches_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Shapes fit demo-moe; save/load round-trips."""
    pred = RoutingPredictor.load(default_predictor_path(MODEL))
    r = runner()
    mc = r.model_config
    assert (pred.num_layers, pred.num_experts) == (mc.num_layers, mc.num_local_experts)
    w, b = pred.probes[(-1, 0)]
    assert w.shape == (mc.num_local_experts, mc.hidden_size) and b.shape == (mc.num_local_experts,)
    assert default_predictor_path(MODEL).stat().st_size < 1_000_000  # small enough to commit
    pred.save(tmp_path / "p.safetensors")
    again = RoutingPredictor.load(tmp_path / "p.safetensors")
    assert torch.equal(again.probes[(2, 3)][0], pred.probes[(2, 3)][0])


def test_next_layer_forecast_beats_chance() -> None:
    """On a fresh decode, layer l's input forecasts layer l+1's top-2 far above 2/16."""
    r = runner()
    ctl = attach_resident(r.model, record_features=True)
    greedy_decode(r, [[0, 400, 401, 402, 403, 404, 405, 406]], 16)
    pred = RoutingPredictor.load(default_predictor_path(MODEL))
    found = total = 0
    for rec in ctl.records:
        for layer in range(pred.num_layers - 1):
            top = pred.top_m(layer, rec.moe_in[layer], 2)[layer + 1]  # [T, 2]
            actual = rec.ids[layer + 1]  # [T, 2]
            found += int((top[:, :, None] == actual[:, None, :]).any(-1).sum())
            total += actual.numel()
    assert found / total > 0.5
