"""`hfedmoe compare`: all files, consistent numbers, identical partitions across methods."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hfedmoe.compare import (compare, comparison_table, late_accuracy_change, rounds_to_target,
                             seconds_to_target)
from hfedmoe.config import load_config_file, parse_run_config

ROOT = Path(__file__).resolve().parents[2]


def test_compare_writes_consistent_files(tmp_path):
    out = tmp_path / "cmp"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "hfedmoe"), "compare", "--methods",
         "hfedmoe,fedavg-full", "--config", "conf/tiny.toml", "--set", "train.local-steps=1",
         "--set", "budget.experts=2,4,16", "--seeds", "2", "--target", "0.2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["methods"]) == {"hfedmoe", "fedavg-full"}
    assert comparison["seeds"] == [0, 1]
    for name in ("comparison.md", "accuracy_by_method.png", "bytes_up_by_method.png",
                 "budget_use_by_method.png"):
        assert (out / name).stat().st_size > 100, name
    # the table is the JSON, formatted
    assert (out / "comparison.md").read_text() == comparison_table(comparison)
    for method, stats in comparison["methods"].items():
        finals = []
        for seed in (0, 1):
            summary = json.loads((out / method / f"seed-{seed}" / "summary.json").read_text())
            finals.append(summary["final_accuracy"])
            assert rounds_to_target(summary, 0.2) == stats["rounds_to_target"]["values"][seed]
            assert late_accuracy_change(summary) == \
                stats["late_accuracy_change"]["values"][seed]
        assert stats["final_accuracy"]["values"] == finals
        assert abs(stats["final_accuracy"]["mean"] - sum(finals) / 2) < 1e-12
    # identical seeds -> identical partitions and budgets across methods
    clients = [m["clients"] for m in comparison["methods"].values()]
    assert [c["num_examples"] for c in clients[0]] == [c["num_examples"] for c in clients[1]]
    assert comparison["methods"]["fedavg-full"]["within_budget"] is False
    assert comparison["methods"]["hfedmoe"]["within_budget"] is True


def test_target_helpers():
    summary = {"accuracy_by_round": [0.1, 0.5, 0.8, 0.9], "round_seconds_by_round": [0, 2, 3, 4]}
    assert rounds_to_target(summary, 0.8) == 2 and seconds_to_target(summary, 0.8) == 5.0
    assert rounds_to_target(summary, 0.95) is None and seconds_to_target(summary, 0.95) is None


def test_late_accuracy_change_is_the_mean_swing_over_the_second_half():
    # 4 rounds: the changes of rounds 3 and 4, |0.6 - 0.2| and |0.6 - 0.6|
    assert late_accuracy_change({"accuracy_by_round": [0.1, 0.5, 0.2, 0.6, 0.6]}) == \
        pytest.approx(0.2)
    # 5 rounds, round 2 failed: round 3's change is unknown, rounds 4 and 5 count
    assert late_accuracy_change({"accuracy_by_round": [0.1, 0.2, None, 0.5, 0.7, 0.6]}) == \
        pytest.approx(0.15)
    alternating = [0.2] + [0.5, 0.8] * 10  # 20 rounds, period 2
    climbing = [0.2 + 0.03 * r for r in range(21)]
    assert late_accuracy_change({"accuracy_by_round": alternating}) == pytest.approx(0.3)
    assert late_accuracy_change({"accuracy_by_round": climbing}) == pytest.approx(0.03)
    settled = [0.2] + [0.5, 0.8] * 5 + [0.8] * 10  # swings in rounds 1-10 only
    assert late_accuracy_change({"accuracy_by_round": settled}) == 0.0
    assert late_accuracy_change({"accuracy_by_round": [0.1, 0.5]}) is None  # one round


def test_the_comparison_table_shows_how_much_each_method_still_swings():
    """comparison.md carries late_accuracy_change beside the accuracies (mean ± std over
    seeds, "n/a" where a run was too short), also for a comparison.json from before the field."""
    def method(late):
        stat = {"mean": 0.5, "std": 0.0, "values": [0.5, 0.5]}
        never = {"mean": None, "std": None, "values": [None, None]}
        m = {"final_accuracy": stat, "best_accuracy": stat, "rounds_to_target": never,
             "seconds_to_target": never, "bytes_up": stat, "bytes_down": stat,
             "within_budget": True}
        return m if late is None else {**m, "late_accuracy_change": late}
    table = comparison_table({"target_accuracy": 0.9, "seeds": [0, 1], "methods": {
        "swinging": method({"mean": 0.15, "std": 0.05, "values": [0.1, 0.2]}),
        "one-round": method({"mean": None, "std": None, "values": [None, None]}),
        "old": method(None)}})
    header = [cell.strip() for cell in table.splitlines()[2].split("|")]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")]
            for line in table.splitlines()[4:]}
    column = header.index("late change")
    assert rows["swinging"][column] == "0.150 ± 0.050"
    assert rows["one-round"][column] == rows["old"][column] == "n/a"
    assert all(len(row) == len(header) for row in rows.values())


def test_an_interrupted_compare_reuses_finished_runs_of_the_same_config(tmp_path):
    from hfedmoe.runner import run_experiment

    config = parse_run_config(load_config_file(ROOT / "conf/tiny.toml"),
                              {"num-server-rounds": 1, "train.local-steps": 1})
    ran: list[tuple[str, int]] = []

    def counting(c):
        ran.append((c.method, c.seed))
        return run_experiment(c)

    first = compare(config, ["hfedmoe", "fedavg"], [0, 1], tmp_path, 0.2, counting)
    # seed-major: an interrupted comparison holds every method's first seeds
    assert ran == [("hfedmoe", 0), ("fedavg", 0), ("hfedmoe", 1), ("fedavg", 1)]
    (tmp_path / "fedavg" / "seed-0" / "summary.json").unlink()  # fedavg "was interrupted"
    again = compare(config, ["hfedmoe", "fedavg"], [0, 1], tmp_path, 0.2, counting)
    assert ran[4:] == [("fedavg", 0)]  # only the unfinished run ran again
    assert again["methods"]["hfedmoe"] == first["methods"]["hfedmoe"]  # read back, as was
    assert again["methods"]["fedavg"]["final_accuracy"] == first["methods"]["fedavg"][
        "final_accuracy"]  # re-run: same result, other wall times
    changed = parse_run_config(config.to_flat(), {"train.lr": 0.01})
    compare(changed, ["hfedmoe"], [0], tmp_path, 0.2, counting)
    assert ran[5:] == [("hfedmoe", 0)]  # another configuration is never reused


def test_a_finished_run_is_not_reused_after_its_data_changed(tmp_path):
    """Keyed on the content of the inputs, not on the configuration text: the same data.path
    with other rows is another run (the earlier one is moved aside, not lost)."""
    from hfedmoe.runner import run_experiment

    data = tmp_path / "data.csv"

    def write(rows):
        data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows),
                        encoding="utf-8")

    write([(f"good news number {i} about shares and profit", "business") if i % 2 else
           (f"the team won match number {i} with a late goal", "sport") for i in range(40)])
    config = parse_run_config(load_config_file(ROOT / "conf/tiny.toml"), {
        "num-server-rounds": 1, "train.local-steps": 1, "data.source": "file",
        "data.path": str(data), "data.num-clients": 2, "data.min-partition-size": 1})
    ran: list[str] = []

    def counting(c):
        ran.append(c.method)
        return run_experiment(c)

    compare(config, ["fedavg"], [0], tmp_path / "cmp", 0.2, counting)
    compare(config, ["fedavg"], [0], tmp_path / "cmp", 0.2, counting)
    assert ran == ["fedavg"]  # same data: reused
    write([(f"stock market item {i} on banks", "business") if i % 3 else
           (f"player {i} scored in the cup final", "sport") for i in range(40)])
    compare(config, ["fedavg"], [0], tmp_path / "cmp", 0.2, counting)
    assert ran == ["fedavg", "fedavg"]  # changed data: run again
    run_dir = tmp_path / "cmp" / "fedavg" / "seed-0"
    before = json.loads((run_dir.with_name("seed-0.1") / "inputs.json").read_text())
    after = json.loads((run_dir / "inputs.json").read_text())
    assert before["data"] != after["data"] and before["model"] == after["model"]
