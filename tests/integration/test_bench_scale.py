"""`hfedmoe bench scale`: the many-clients benchmark runs, and what it measures follows the
sampled clients, not the connected ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfedmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_scale_rows_follow_the_sampled_clients(tmp_path, capsys):
    out_json = tmp_path / "scale.json"
    code = main(["bench", "scale", "--config", str(ROOT / "conf/tiny.toml"),
                 "--clients", "4,40", "--sampled", "2", "--rounds", "2",
                 "--runtimes", "inprocess", "--set", "data.min-partition-size=1",
                 "--set", "train.local-steps=1", "--json", str(out_json),
                 "--out", str(tmp_path / "runs")])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["runtime"], r["clients"], r["sampled"]) for r in rows] == [
        ("inprocess", 4, 2), ("inprocess", 40, 2)]
    for row in rows:
        assert row["trained_per_round"] == 2 and 1 <= row["evaluated_per_round"] <= 2
        assert len(row["client_process_resident_mib_by_round"]) == 2
        # measured, not assumed: a process holding a model and torch is over 100 MiB, and
        # its peak covers what it held after every round (the kernel's counters agree to
        # within a MiB)
        assert row["client_process_peak_mib"] >= max(
            row["client_process_resident_mib_by_round"]) - 1 > 100
        assert row["server_peak_mib"] > 100
    # the bytes of a round are those of the K sampled clients, whatever N: two train and two
    # evaluate instructions carrying the same global state
    assert rows[0]["mib_down_per_round"] == rows[1]["mib_down_per_round"] > 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| runtime | connected N") and len(printed) == 4
    assert (tmp_path / "runs" / "inprocess-n40" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["--clients", "4,x"], "--clients"),
    (["--runtimes", "bogus"], "simulation.runtime"),
    (["--sampled", "0"], ">= 1"),
])
def test_bench_scale_bad_input_exits_2_before_any_run(tmp_path, capsys, args, fragment):
    code = main(["bench", "scale", "--config", str(ROOT / "conf/tiny.toml"),
                 "--out", str(tmp_path / "runs"), *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "runs").exists()
