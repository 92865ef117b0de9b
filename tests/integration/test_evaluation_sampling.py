"""Client-side (personalised) evaluation that scales: every k-th round and the last, on a
seeded sample of the clients; the centralised evaluation still runs every round."""

from __future__ import annotations

import json
from pathlib import Path

from hfedmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_personal_evaluation_every_k_rounds_on_a_sample(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "conf/tiny.toml"), "--set", "data.num-clients=4",
            "--set", "num-server-rounds=3", "--set", "train.evaluate-every=2",
            "--set", "train.fraction-evaluate=0.5", "--set", "checkpoint.every=0",
            "--out", str(out)]
    assert main(args) == 0
    by_round = {r["round"]: r for r in records(out)}
    assert all(by_round[r]["accuracy"] is not None for r in range(4))  # central: every round
    assert by_round[1]["personal_accuracy"] is None  # not a multiple of 2, not the last
    evaluated = {r: [p["client_id"] for p in by_round[r]["personal"]] for r in (2, 3)}
    assert all(len(ids) == 2 for ids in evaluated.values())  # half of the 4 clients
    for r, ids in evaluated.items():
        accuracies = [p["accuracy"] for p in by_round[r]["personal"]]
        assert by_round[r]["personal_accuracy"] == sum(accuracies) / 2
    # every byte counted: the evaluation instructions carry the global state to 2 clients
    state_bytes = by_round[2]["clients"][0]["bytes_down"]  # one train instruction
    assert by_round[1]["bytes_down_evaluate"] == 0
    for r in (2, 3):
        assert by_round[r]["bytes_down_evaluate"] == 2 * state_bytes
        assert by_round[r]["bytes_down"] == by_round[r]["bytes_down_train"] + 2 * state_bytes
    # the same seed samples the same clients again (a second run of the same config)
    again = tmp_path / "again"
    assert main(args[:-1] + [str(again)]) == 0
    assert {r["round"]: [p["client_id"] for p in r.get("personal") or []]
            for r in records(again)} == {r["round"]: [p["client_id"] for p in r.get("personal")
                                                       or []] for r in records(out)}
