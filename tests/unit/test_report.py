"""Run outputs (report.py), the progress display (progress.py) and docs/configuration.md.

Expectations are written out by hand from the records below, not computed by the code.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from hfedmoe.config import default_flat_config, load_config_file, parse_run_config
from hfedmoe.progress import ProgressDisplay, format_bytes
from hfedmoe.report import RunRecorder, build_summary, flat_to_toml, read_metrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def client(client_id, num_examples, budget, active, memory, step, up=10, down=20, loss=1.0):
    return {"client_id": client_id, "num_examples": num_examples, "train_loss": loss,
            "budget_experts": budget, "max_active_experts_per_batch": active,
            "peak_memory_bytes": memory, "mean_step_seconds": step,
            "bytes_up": up, "bytes_down": down}


def record(number, accuracy, loss, train_loss, up, down, clients, failures=()):
    return {"round": number, "accuracy": accuracy, "loss": loss, "train_loss": train_loss,
            "bytes_up": up, "bytes_down": down, "round_seconds": 2.0 + number,
            "elapsed_seconds": 10.0 * number, "clients": list(clients),
            "failures": list(failures)}


def run_records():
    """Round 0 (initial evaluation) and three training rounds; best accuracy is round 2."""
    return [
        record(0, 0.25, 1.6, None, 0, 0, []),
        record(1, 0.60, 1.1, 1.3, 300, 1000,
               [client(2, 40, 3, 3, 5000, 0.2), client(0, 50, 6, 5, 9000, 0.4)],
               [{"client_id": 1, "reason": "timeout"}]),
        record(2, 0.80, 0.7, 0.9, 450, 1500,
               [client(0, 50, 6, 6, 8000, 0.6), client(1, 30, 2, 2, 3000, 0.1),
                client(2, 40, 3, 2, 6000, 0.4)]),
        record(3, 0.75, 0.75, 0.8, 100, 200, [client(0, 50, 5, 4, 8500, 0.5)]),
    ]


# ---- build_summary ----------------------------------------------------------------------

def test_build_summary_against_hand_computed_values():
    records = run_records()
    random.Random(1).shuffle(records)  # order of records must not matter
    summary = build_summary("fedavg", records, wall_seconds=42.5)

    assert summary["method"] == "fedavg"
    assert summary["rounds"] == 3
    assert summary["final_accuracy"] == 0.75
    assert summary["final_loss"] == 0.75
    assert summary["best_accuracy"] == 0.80
    assert summary["best_round"] == 2
    assert summary["accuracy_by_round"] == [0.25, 0.60, 0.80, 0.75]
    assert summary["loss_by_round"] == [1.6, 1.1, 0.7, 0.75]
    assert summary["train_loss_by_round"] == [None, 1.3, 0.9, 0.8]
    assert summary["bytes_up"] == 850
    assert summary["bytes_down"] == 2700
    assert summary["wall_seconds"] == 42.5
    assert summary["failures"] == [{"round": 1, "client_id": 1, "reason": "timeout"}]

    clients = summary["clients"]
    assert [c["client_id"] for c in clients] == [0, 1, 2]
    c0, c1, c2 = clients
    assert c0["budget_experts"] == 5  # latest round's budget
    assert (c0["max_active_experts_per_batch"], c0["peak_memory_bytes"]) == (6, 9000)
    assert (c0["num_examples"], c0["rounds_participated"]) == (50, 3)
    assert c0["mean_step_seconds"] == pytest.approx(0.5)  # (0.4 + 0.6 + 0.5) / 3
    assert (c1["budget_experts"], c1["max_active_experts_per_batch"]) == (2, 2)
    assert (c1["peak_memory_bytes"], c1["rounds_participated"]) == (3000, 1)
    assert c1["mean_step_seconds"] == pytest.approx(0.1)
    assert (c2["budget_experts"], c2["max_active_experts_per_batch"]) == (3, 3)
    assert (c2["peak_memory_bytes"], c2["num_examples"], c2["rounds_participated"]) == (6000, 40, 2)
    assert c2["mean_step_seconds"] == pytest.approx(0.3)


def test_build_summary_marks_missing_rounds_and_earliest_best():
    records = [record(0, 0.5, 1.0, None, 0, 0, []), record(2, 0.5, 0.9, 0.8, 5, 7, [])]
    summary = build_summary("fedavg", records, 1.0)
    assert summary["accuracy_by_round"] == [0.5, None, 0.5]
    assert summary["best_round"] == 0 and summary["rounds"] == 1
    assert summary["clients"] == []


@pytest.mark.parametrize("records, message", [
    ([], "no round records"),
    ([record(1, 0.5, 1, 1, 0, 0, []), record(1, 0.6, 1, 1, 0, 0, [])], "recorded twice"),
    ([{k: v for k, v in record(1, 0.5, 1, 1, 0, 0, []).items() if k != "loss"}], "'loss'"),
    ([record(1, 0.5, 1, 1, 0, 0, [{"client_id": 3}])], "'num_examples'"),
    ([record(1, 0.5, 1, 1, 0, 0, [client(3, 1, 1, 1, 1, 1.0)] * 2)], "listed twice"),
    ([record(-1, 0.5, 1, 1, 0, 0, [])], "integer >= 0"),
])
def test_build_summary_rejects_malformed_records(records, message):
    with pytest.raises(ValueError, match=message):
        build_summary("fedavg", records, 1.0)


# ---- RunRecorder: metrics.jsonl, summary.json, plots --------------------------------------

def test_metrics_jsonl_round_trip_keeps_extra_keys(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 99}\n')  # an earlier run's leftovers
    recorder = RunRecorder(tmp_path, parse_run_config())
    records = run_records()
    records[2]["diagnostics"] = {"usage": np.array([0.5, 0.25]), "consistency": np.float32(0.5)}
    for rec in records:
        recorder.record_round(rec)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["round"] == i for i, line in enumerate(lines))
    expected = run_records()
    expected[2]["diagnostics"] = {"usage": [0.5, 0.25], "consistency": 0.5}
    assert read_metrics(tmp_path) == expected


def test_record_round_rejects_a_record_without_required_keys(tmp_path):
    recorder = RunRecorder(tmp_path, parse_run_config())
    with pytest.raises(ValueError, match="'bytes_up'"):
        recorder.record_round({"round": 1, "accuracy": 0.5, "loss": 1.0})
    assert read_metrics(tmp_path) == []


def test_finish_writes_typed_summary_and_valid_pngs(tmp_path):
    recorder = RunRecorder(tmp_path / "run", parse_run_config())
    for rec in run_records():
        recorder.record_round(rec)
    returned = recorder.finish(wall_seconds=12.0)

    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == returned
    types = {"method": str, "rounds": int, "final_accuracy": float, "best_accuracy": float,
             "accuracy_by_round": list, "loss_by_round": list, "bytes_up": int,
             "bytes_down": int, "wall_seconds": float, "clients": list}
    for key, expected_type in types.items():
        assert type(on_disk[key]) is expected_type, key
    assert len(on_disk["accuracy_by_round"]) == 4
    client_types = {"client_id": int, "budget_experts": int, "max_active_experts_per_batch": int,
                    "peak_memory_bytes": int, "num_examples": int, "rounds_participated": int,
                    "mean_step_seconds": float}
    for entry in on_disk["clients"]:
        assert {k: type(entry[k]) for k in client_types} == client_types

    for name in ("accuracy.png", "loss.png"):
        data = (tmp_path / "run" / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5_000, name
        assert imread(tmp_path / "run" / name).shape[:2] == (400, 600)
    # the curves are drawn: matplotlib's first two default colours, C0 blue and C1 orange
    accuracy, loss = (imread(tmp_path / "run" / n)[..., :3] for n in ("accuracy.png", "loss.png"))
    assert _pixels_near(accuracy, C0) > 200 and _pixels_near(accuracy, C1) == 0
    assert _pixels_near(loss, C0) > 200 and _pixels_near(loss, C1) > 200  # test + train loss


C0, C1 = (0x1F / 255, 0x77 / 255, 0xB4 / 255), (0xFF / 255, 0x7F / 255, 0x0E / 255)


def _pixels_near(rgb, colour, tolerance=0.06):
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) < tolerance).sum())


def test_records_are_copied_when_recorded(tmp_path):
    recorder = RunRecorder(tmp_path, parse_run_config())
    records = run_records()
    for rec in records:
        recorder.record_round(rec)
        rec["accuracy"] = 0.0  # the caller reuses its dict; what was recorded must not change
    assert recorder.finish(1.0)["accuracy_by_round"] == [0.25, 0.60, 0.80, 0.75]


def test_finish_without_rounds_raises(tmp_path):
    with pytest.raises(ValueError, match="no round records"):
        RunRecorder(tmp_path, parse_run_config()).finish(1.0)


# ---- config.toml ------------------------------------------------------------------------

def test_config_toml_round_trips_to_an_equal_run_config(tmp_path):
    tricky = 'runs/"quoted" back\\slash\ttab\nnewline \u00fc \x7f end'
    config = parse_run_config({"out": tricky, "data.path": "C:\\data\\x.jsonl",
                               "train.lr": 1e-05, "model.top-k": 3, "model.dropout": 0.1,
                               "simulation.runtime": "inprocess", "num-server-rounds": 7})
    RunRecorder(tmp_path, config)
    path = tmp_path / "config.toml"

    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert raw["out"] == tricky
    assert raw["model"]["top-k"] == 3 and raw["train"]["lr"] == 1e-05
    assert raw["simulation"] == {"runtime": "inprocess", "client-cpus": 2}
    flat = load_config_file(path)
    assert flat == config.to_flat()
    assert all(type(flat[k]) is type(v) for k, v in config.to_flat().items())
    assert parse_run_config(flat) == config


def test_flat_to_toml_nests_dotted_keys_and_quotes_odd_ones():
    flat = {"a": 1, "x.y.z": "s", "x.w": True, "odd key.v": 1.5, "n": -math.inf, "t.b": False}
    assert tomllib.loads(flat_to_toml(flat)) == {
        "a": 1, "n": -math.inf, "x": {"w": True, "y": {"z": "s"}}, "odd key": {"v": 1.5},
        "t": {"b": False}}
    with pytest.raises(ValueError, match="both a value and a table"):
        flat_to_toml({"a": 1, "a.b": 2})


# ---- progress display -------------------------------------------------------------------

RECORD_LINE = ("round 1/3 done: accuracy 0.6000, loss 1.1000, train loss 1.3000, "
               "up 300 B, down 1000 B, 3.0 s, elapsed 10.0 s")


def test_progress_display_writes_plain_lines_to_a_non_terminal():
    stream = io.StringIO()
    with ProgressDisplay(stream) as display:
        display.start(num_rounds=3, num_clients=2)
        display.round_finished(run_records()[0])
        display.round_started(1)
        display.client_finished(1, 2, client(2, 40, 3, 3, 5000, 0.2, loss=1.25))
        display.client_finished(1, 0, {"num_examples": 50, "train_loss": math.nan})
        display.client_finished(1, 5, {"error": "ClientApp raised"})
        display.client_finished(1, 4, {"num-examples": 7.0, "budget-experts": 2,
                                       "max-active-experts-per-batch": 1.0})  # reply names
        display.round_finished(run_records()[1])
    display.client_finished(2, 0, {})  # after close: silent
    assert stream.getvalue().splitlines() == [
        "hfedmoe: 3 rounds, 2 clients per round",
        "round 0 (initial model): accuracy 0.2500, loss 1.6000, up 0 B, down 0 B, "
        "2.0 s, elapsed 0.0 s",
        "round 1/3 started",
        "  round 1 client 2 [1/2]: 40 examples, train loss 1.2500, active experts 3/3, "
        "step 0.200 s",
        "  round 1 client 0 [2/2]: 50 examples, train loss nan, active experts ?/?, step ? s",
        "  round 1 client 5 [3/2]: failed: ClientApp raised",
        "  round 1 client 4 [4/2]: 7 examples, train loss ?, active experts 1/2, step ? s",
        RECORD_LINE,
        "  failure: client 1: timeout",
    ]


def test_progress_display_counts_the_sampled_clients_of_a_round():
    """100 connected, 10 sampled: the header, the round line and each reply's [k/10] say so."""
    stream = io.StringIO()
    with ProgressDisplay(stream) as display:
        display.start(num_rounds=3, num_clients=100, sampled=10)
        display.round_started(1, 10)
        display.client_finished(1, 42, client(42, 40, 3, 3, 5000, 0.2, loss=1.25))
        display.round_started(2, 9)  # a node was lost: fewer sampled
        display.client_finished(2, 7, {"error": "ClientApp raised"})
    assert stream.getvalue().splitlines() == [
        "hfedmoe: 3 rounds, 10 of 100 clients sampled per round",
        "round 1/3 started (10 of 100 clients)",
        "  round 1 client 42 [1/10]: 40 examples, train loss 1.2500, active experts 3/3, "
        "step 0.200 s",
        "round 2/3 started (9 of 100 clients)",
        "  round 2 client 7 [1/9]: failed: ClientApp raised",
    ]


def test_progress_header_names_the_run_and_counts_in_the_singular_when_one():
    """A comparison's runs print one after another: the header says which method and seed."""
    stream = io.StringIO()
    with ProgressDisplay(stream) as display:
        display.start(num_rounds=1, num_clients=1, name="fedalign, seed 2")
    assert stream.getvalue().splitlines() == ["hfedmoe: fedalign, seed 2: 1 round, 1 client per round"]


def test_progress_display_styles_a_terminal_and_survives_broken_streams():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with ProgressDisplay(terminal) as display:
        display.start(3, 2)
        display.round_started(1)
        display.round_finished(run_records()[1])
    text = re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue())
    assert "round 1/3 started" in text and RECORD_LINE in text

    class Broken(io.StringIO):
        def isatty(self):
            raise OSError("no tty")

        def write(self, text):
            raise BrokenPipeError("gone")

    closed = io.StringIO()
    closed.close()
    for stream in (Broken(), closed):
        with ProgressDisplay(stream) as display:
            display.start(1, 1)
            display.round_started(1)
            display.client_finished(1, 0, {"train_loss": float("nan")})
            display.round_finished(run_records()[1])


def test_format_bytes_uses_binary_units():
    assert [format_bytes(n) for n in (0, 1023, 1536, 3 * 2**20, 5 * 2**30, None)] == [
        "0 B", "1023 B", "1.5 KiB", "3.0 MiB", "5.0 GiB", "?"]


# ---- docs/configuration.md --------------------------------------------------------------

def _toml_literal(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def test_configuration_doc_lists_every_key_with_its_default():
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 5:
            rows[cells[0].strip("`")] = cells
    for key, default in default_flat_config().items():
        assert key in rows, f"{key} is not documented"
        assert rows[key][1] == type(default).__name__, key
        assert rows[key][2] == f"`{_toml_literal(default)}`", key


def test_causal_lm_summary_has_the_personalised_perplexity():
    """Mean over clients of exp(own loss), by hand; None in rounds without client evaluation."""
    records = run_records()
    records[2]["personal"] = [{"client_id": 0, "num_examples": 5, "accuracy": 0.5,
                               "loss": math.log(4.0)},
                              {"client_id": 1, "num_examples": 9, "accuracy": 0.4,
                               "loss": math.log(10.0)}]
    records[3]["personal"] = [{"client_id": 0, "num_examples": 5, "accuracy": 0.6,
                               "loss": math.log(2.0)}]
    summary = build_summary("hfedmoe", records, 1.0, task="causal-lm")
    assert summary["personal_perplexity_by_round"][:3] == [None, None, pytest.approx(7.0)]
    assert summary["final_personal_perplexity"] == pytest.approx(2.0)
    assert "final_personal_perplexity" not in build_summary("hfedmoe", records, 1.0)
