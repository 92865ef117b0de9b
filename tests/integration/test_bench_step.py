"""`hfedmoe bench step` on the tiny model: every configuration keeps its budget as measured,
the ratios are to the full-training row, and what a budget saves is there in exact FLOPs."""

import json
from pathlib import Path

import pytest

from hfedmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 16  # tiny:qwen2_moe: 2 MoE layers x 8 experts


@pytest.mark.parametrize("mode", ["one-pass", "recompute"])
def test_bench_step_writes_measured_rows_within_each_budget(tmp_path, capsys, mode):
    out = tmp_path / "bench.json"
    code = main(["bench", "step", "--config", str(ROOT / "conf/tiny.toml"),
                 "--set", f"budget.mode={mode}", "--budgets", f"2,4,8,{TOTAL}",
                 "--steps", "2", "--repeats", "1", "--json", str(out)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model tiny:qwen2_moe, batch 8 x 64 tokens, 2 steps x 1 repeats")
    written = json.loads(out.read_text())
    rows, meta = written["rows"], written["meta"]
    assert [r["budget"] for r in rows] == [TOTAL, 2, 4, 8, TOTAL]
    assert len(lines) == 5 + len(rows)  # the table printed is the rows written, + 2 lines
    assert meta["total_experts"] == TOTAL and len(meta["model_fingerprint"]) == 64
    # the floor (no expert learns) lies below every budget's step FLOPs
    assert 0 < meta["floor_flops_ratio"] < min(r["ideal_ratio"] for r in rows[1:])
    assert lines[-1].startswith("budgets of the device profiles with this calibration: phone")
    assert lines[-2].startswith(f"floor: with no expert learning a step still costs "
                                f"{meta['floor_flops_ratio']:.2f}x")
    full, *budgeted = rows
    for key in ("step_time_ratio", "peak_memory_ratio", "peak_memory_estimate_ratio",
                "backward_flops_ratio", "ideal_ratio",
                "trainable_state_ratio", "active_slot_share"):
        assert full[key] == 1.0, key
    assert budgeted[-1]["backward_flops_ratio"] == 1.0  # a full budget trains the plain way
    for row in budgeted:
        assert 1 <= row["max_active_experts_per_batch"] <= row["budget"]
        assert row["step_time_ratio"] > 0 and row["peak_memory_ratio"] > 0
    small = budgeted[:-1]
    shares = [r["active_slot_share"] for r in small]
    assert 0 < shares[0] < shares[1] < shares[2] < 1
    state = [r["trainable_state_ratio"] for r in small]
    assert state[0] < state[1] < state[2] < 1  # gradients and moments of fewer experts
    flops = [r["backward_flops_ratio"] for r in small]
    if mode == "one-pass":  # the expert backward shrinks with the budget
        assert flops[0] < flops[1] < flops[2] < 1
        assert small[0]["peak_memory_ratio"] < 1  # as the allocator measured it
        for row in small:  # and follows the learning experts' share of the routed slots
            assert abs(row["expert_backward_flops_ratio"] - row["active_slot_share"]) < 0.05
    else:  # recompute: the active experts' forward runs again in the backward
        assert all(r["expert_backward_flops_ratio"] > r["active_slot_share"] for r in small)


@pytest.mark.parametrize("setup", [[], ["train.adapter=lora", "model.quantization=nf4"]],
                         ids=["experts", "lora-nf4"])
def test_a_run_takes_device_budgets_from_a_bench_calibration(tmp_path, capsys, setup):
    """bench --json is a calibration: a run given it resolves device profiles through the
    measured figures, sends them to its clients, stores them, refuses another shape or
    training setup, and the budget a profile gets fits the profile's memory as the run's
    clients measured it (full expert training, and LoRA factors on a 4-bit base)."""
    import math

    from hfedmoe.calibration import MEMORY_HEADROOM, load_calibration

    cal_file = tmp_path / "bench.json"
    tiny = ["--config", str(ROOT / "conf/tiny.toml"),
            *[arg for key in setup for arg in ("--set", key)]]
    assert main(["bench", "step", *tiny, "--budgets", "2,4,8", "--steps", "2",
                 "--repeats", "1", "--json", str(cal_file)]) == 0
    calibration = load_calibration(cal_file)
    memory = math.ceil(calibration.peak_memory_bytes(8) * (1 + MEMORY_HEADROOM))
    expected = calibration.budget_for(memory, 1.0, min_budget=2)
    assert 8 <= expected <= TOTAL
    assert calibration.budget_for(memory - 2, 1.0, min_budget=2) < 8  # the headroom counts
    out = tmp_path / "run"
    run = ["run", *tiny, "--set", f"budget.calibration={cal_file}", "--set",
           f"budget.experts=mem={memory}B:speed=1.0,2", "--set", "num-server-rounds=2",
           "--set", "checkpoint.every=0"]
    assert main([*run, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records[1:]:
        budgets = {c["client_id"]: c["budget_experts"] for c in record["clients"]}
        assert budgets == {0: expected, 1: 2, 2: expected}
        for client in record["clients"]:  # the profile's budget fits, as measured
            assert client["max_active_experts_per_batch"] <= client["budget_experts"]
            if client["client_id"] != 1:
                assert client["peak_memory_bytes"] <= memory, client
    assert load_calibration(out / "calibration.json") == calibration
    assert "calibration" in json.loads((out / "inputs.json").read_text())
    capsys.readouterr()
    assert main([*run, "--out", str(tmp_path / "other"), "--set", "train.batch-size=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hfedmoe: error: config key 'budget.calibration': "
                   f"{cal_file}: the calibration was measured with train.batch-size 8, "
                   f"the run has 4; measure it again with `hfedmoe bench step --json` on "
                   f"this run's settings"]
    changed, what = (("model.quantization=none", "model.quantization nf4, the run has none")
                     if setup else ("train.adapter=lora", "train.adapter none, the run has lora"))
    assert main([*run, "--out", str(tmp_path / "other"), "--set", changed]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the calibration was measured with {what};" in err[0]


def test_the_estimated_budget_of_a_lora_client_on_a_4bit_base_fits_as_measured(tmp_path):
    """Without a calibration the cost model (hfedmoe.costs) charges a LoRA client its
    quantized base, the dequantization workspace and its factors' state: the budget it gives
    a profile is below the full budget and the clients' measured peaks fit the profile."""
    memory = 14_000_000
    out = tmp_path / "run"
    assert main(["run", "--config", str(ROOT / "conf/tiny.toml"), "--set",
                 "train.adapter=lora", "--set", "model.quantization=nf4", "--set",
                 f"budget.experts=mem={memory}B:speed=1.0", "--set", "num-server-rounds=1",
                 "--set", "data.num-clients=2", "--set", "checkpoint.every=0",
                 "--out", str(out)]) == 0
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    for client in record["clients"]:
        assert 2 <= client["budget_experts"] < TOTAL
        assert client["max_active_experts_per_batch"] <= client["budget_experts"]
        assert client["peak_memory_bytes"] <= memory, client
