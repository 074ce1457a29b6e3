"""`batonserve profile` times the real engine into a table the simulator and planner read."""

from __future__ import annotations

from batonserve.cluster.cli import main
from batonserve.cluster.sim.perf_model import TablePerfModel, read_table


def test_profile_writes_a_table_the_planner_uses(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    table = tmp_path / "demo.csv"
    rc = main(
        [
            "profile", "--model", "demo", "--output", str(table), "--threads", "1",
            "--prompt-sizes", "16,96", "--batch-sizes", "1,3", "--batch-prompt", "32",
            "--token-size", "3", "--repeats", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    rows = read_table(table)
    assert [(r.prompt_size, r.batch_size) for r in rows] == [(16, 1), (96, 1), (32, 3)]
    assert all(r.model == "demo" and r.hardware == "cpu" for r in rows)
    assert all(r.prompt_time_ms > 0 and r.token_time_ms > 0 for r in rows)
    m = TablePerfModel.from_csv(table, "demo", "cpu")
    assert m.step_time(96, 0) > 0 and m.step_time(0, 3) > 0
    capsys.readouterr()
    rc = main(
        [
            "plan", "--model", "demo", "--perf-table", str(table), "--machine", "cpu=1:100",
            "--budget", "3", "--requests", "30", "--iters", "2", "--max-designs", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "Splitwise-cpu" in out and "Baseline-cpu" in out
