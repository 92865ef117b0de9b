"""`hfedmoe bench step` on the tiny model: every configuration keeps its budget as measured,
the ratios are to the full-training row, and the table printed is the one computed."""

from pathlib import Path

from hfedmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_step_prints_measured_rows_within_each_budget(capsys):
    code = main(["bench", "step", "--config", str(ROOT / "conf/tiny.toml"),
                 "--budgets", "2,4", "--steps", "2", "--repeats", "1"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model tiny:qwen2_moe, batch 8 x 64 tokens, 2 steps x 1 repeats")
    rows = [line.split() for line in lines[3:]]
    assert [r[:2] for r in rows] == [["full", "training"], ["hfedmoe", "budget"],
                                     ["hfedmoe", "budget"]]
    full, *limited = rows
    total = int(full[2])  # full training: budget = every expert of the model
    assert int(full[3]) <= total and float(full[5]) == 1.0 and float(full[7]) == 1.0
    for row, budget in zip(limited, (2, 4)):
        assert int(row[3]) == budget and int(row[4]) <= budget  # max active experts measured
        assert float(row[5]) > 0 and float(row[6]) > 0
