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
    rows = json.loads(out.read_text())["rows"]
    assert [r["budget"] for r in rows] == [TOTAL, 2, 4, 8, TOTAL]
    assert len(lines) == 3 + len(rows)  # the table printed is the rows written
    full, *budgeted = rows
    for key in ("step_time_ratio", "peak_memory_ratio", "backward_flops_ratio", "ideal_ratio",
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
        for row in small:  # and follows the learning experts' share of the routed slots
            assert abs(row["expert_backward_flops_ratio"] - row["active_slot_share"]) < 0.05
    else:  # recompute: the active experts' forward runs again in the backward
        assert all(r["expert_backward_flops_ratio"] > r["active_slot_share"] for r in small)
