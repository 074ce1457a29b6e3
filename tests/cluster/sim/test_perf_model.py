"""Performance tables: piecewise-linear interpolation over batch tokens, table round trip."""

from __future__ import annotations

import statistics

import pytest

from batonserve.cluster.sim.perf_model import (
    SPLITWISE_TABLE,
    PiecewiseLinear,
    TablePerfModel,
    TableRow,
    read_table,
    write_table,
)


def test_piecewise_linear_interpolates_clamps_and_extrapolates() -> None:
    f = PiecewiseLinear([100, 200, 400], [1.0, 2.0, 6.0])
    assert f(100) == 1.0 and f(200) == 2.0 and f(400) == 6.0
    assert f(150) == pytest.approx(1.5)
    assert f(300) == pytest.approx(4.0)
    assert f(10) == 1.0  # below the table: flat, never extrapolated down to zero
    assert f(500) == pytest.approx(8.0)  # beyond: the last segment's slope
    with pytest.raises(ValueError, match="increasing"):
        PiecewiseLinear([1, 1], [0, 0])


def test_splitwise_table_medians_at_the_profiled_points() -> None:
    rows = [
        r
        for r in read_table(SPLITWISE_TABLE)
        if (r.model, r.hardware, r.tensor_parallel) == ("llama2-70b", "a100-80gb", 8)
    ]
    m = TablePerfModel.from_csv(SPLITWISE_TABLE, "llama2-70b", "a100-80gb", 8)
    at_2048 = [r.prompt_time_ms for r in rows if r.prompt_size * r.batch_size == 2048]
    assert m.step_time(2048, 0) == pytest.approx(statistics.median(at_2048) / 1e3)
    b16 = [r.token_time_ms for r in rows if r.batch_size == 16]
    assert m.step_time(0, 16) == pytest.approx(statistics.median(b16) / 1e3)
    # A step with prompt chunks and decodes: a prefill of all its tokens, 10% slower.
    assert m.step_time(1000, 24) == pytest.approx(m.prefill(1024) * 1.1)
    # H100 prefill is faster than A100 on the same batch.
    h = TablePerfModel.from_csv(SPLITWISE_TABLE, "llama2-70b", "h100-80gb", 8)
    assert h.step_time(2048, 0) < m.step_time(2048, 0)
    with pytest.raises(ValueError, match="no rows"):
        TablePerfModel.from_csv(SPLITWISE_TABLE, "llama2-70b", "tpu", 8)


def test_table_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = [
        TableRow("demo", "cpu", p, b, 8, float(p * b) / 100, 1.0 + b, 1)
        for p, b in ((16, 1), (64, 1), (16, 4))
    ]
    path = tmp_path / "t.csv"
    write_table(path, rows)
    assert read_table(path) == rows
    m = TablePerfModel.from_csv(path, "demo", "cpu")
    assert m.step_time(64, 0) == pytest.approx(0.64 / 1e3)
    (tmp_path / "bad.csv").write_text("model,hardware\nx,y\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_table(tmp_path / "bad.csv")
