"""Budgets from a calibration measured on the model (hfedmoe.calibration), checked against
hand computation: interpolation, the monotone envelope, the memory and time limits, the
floor, and one-line errors for files that are not calibrations or do not fit the run."""

from __future__ import annotations

import json

import pytest

from hfedmoe.budget import resolve_budget
from hfedmoe.calibration import (
    Calibration,
    CalibrationError,
    CalibrationPoint,
    from_bench,
    load_calibration,
)

MB = 10**6


def calibration(points=((6, 0.84, 100), (12, 0.89, 120), (48, 1.0, 200))) -> Calibration:
    return Calibration("m", "f" * 64, 16, 128, "one-pass", 48, 0.77,
                       tuple(CalibrationPoint(b, r, m * MB) for b, r, m in points))


def test_interpolates_linearly_and_clamps_below_the_first_point():
    c = calibration()
    assert c.step_time_ratio(9) == pytest.approx(0.84 + 0.05 * 3 / 6)
    assert c.step_time_ratio(30) == pytest.approx(0.89 + 0.11 * 18 / 36)
    assert c.peak_memory_bytes(30) == pytest.approx(120 * MB + 80 * MB * 18 / 36, abs=1)
    assert c.step_time_ratio(2) == c.step_time_ratio(6) == 0.84  # no extrapolation down
    assert c.step_time_ratio(48) == 1.0 and c.peak_memory_bytes(48) == 200 * MB


def test_noisy_points_never_make_a_larger_budget_cheaper():
    c = calibration(((6, 0.90, 100), (12, 0.86, 130), (48, 1.0, 200)))  # 12 measured faster
    assert c.step_time_ratio(12) == 0.90 and c.step_time_ratio(9) == 0.90
    ratios = [c.step_time_ratio(b) for b in range(1, 49)]
    assert ratios == sorted(ratios)


def test_budget_for_takes_the_largest_budget_within_memory_and_time():
    c = calibration()
    # memory: (120 + (C - 12) * 80 / 36) * 1.05 <= 136.5 MB  ->  C <= 16.5
    assert c.budget_for(136.5 * MB, 1.0, min_budget=2) == 16
    # the 5% headroom: 130 MB holds 123.8 MB of measured peak -> C <= 13.7
    assert c.budget_for(130 * MB, 1.0, min_budget=2) == 13
    # time: 0.84 + 0.05 * (C - 6) / 6 <= 0.87  ->  C <= 9.6
    assert c.budget_for(10**12, 0.87, min_budget=2) == 9
    assert c.budget_for(10**12, 1.0, min_budget=2) == 48
    # below the floor (0.84 at the smallest measured budget): the smallest that fits
    assert c.budget_for(10**12, 0.5, min_budget=2) == 2
    with pytest.raises(CalibrationError, match="'phone' has 104000000 bytes .* 100000000 bytes"):
        c.budget_for(104 * MB, 1.0, min_budget=2, name="phone")  # 100 MB + 5% > 104 MB


def test_resolve_budget_uses_the_calibration_for_profiles_only():
    c = calibration()
    spec = "mem=130MB:speed=0.87,7,all"
    got = [resolve_budget(spec, i, total_experts=48, min_budget=2, calibration=c)
           for i in range(3)]
    assert got == [9, 7, 48]  # min(13 by memory, 9 by time); direct budgets unchanged


def test_from_bench_keeps_full_training_as_the_full_budget_point(tmp_path):
    meta = {"model": "m", "model_fingerprint": "f", "batch_size": 16, "max_length": 128,
            "budget_mode": "one-pass", "total_experts": 48, "floor_flops_ratio": 0.7}
    rows = [{"budget": 48, "step_time_ratio": 1.0, "peak_memory_bytes": 200},
            {"budget": 12, "step_time_ratio": 0.9, "peak_memory_bytes": 150},
            {"budget": 48, "step_time_ratio": 1.03, "peak_memory_bytes": 201}]
    c = from_bench(meta, rows)
    assert [(p.budget, p.step_time_ratio) for p in c.points] == [(12, 0.9), (48, 1.0)]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    assert load_calibration(path) == c
    stored = tmp_path / "calibration.json"
    stored.write_text(c.to_json())
    assert load_calibration(stored) == c  # a run's stored copy loads too


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read it"),
    ("{not json", "not JSON"),
    ('{"rows": []}', "no meta and rows"),
    ('{"meta": {"model": "m"}, "rows": []}', "KeyError"),
    ('{"meta": {"model": "m", "model_fingerprint": "f", "batch_size": 1, "max_length": 8, '
     '"budget_mode": "one-pass", "total_experts": 4, "floor_flops_ratio": 0.5}, '
     '"rows": [{"budget": 2, "step_time_ratio": 0.5, "peak_memory_bytes": 9}]}',
     "no point at the full budget"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError) as info:
        load_calibration(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert fragment in message


def test_check_fits_names_the_first_difference():
    c = calibration()
    c.check_fits("f" * 64, 16, 128, "one-pass", 48)
    with pytest.raises(CalibrationError, match="train.batch-size 16, the run has 8"):
        c.check_fits("f" * 64, 8, 128, "one-pass", 48)
    with pytest.raises(CalibrationError, match="model fingerprint"):
        c.check_fits("0" * 64, 16, 128, "one-pass", 48)


def test_a_calibration_of_full_training_does_not_fit_a_lora_run():
    """Adapter, LoRA rank, quantization, ... change a step's memory several-fold: a run whose
    training setup differs from the measured one is refused, naming the key; files written
    before the setup was recorded count as measured with the defaults (full training)."""
    from hfedmoe.calibration import SETUP_DEFAULTS
    from hfedmoe.config import parse_run_config

    full = calibration()
    assert dict(full.setup) == SETUP_DEFAULTS
    full.check_fits("f" * 64, 16, 128, "one-pass", 48, SETUP_DEFAULTS)
    lora_nf4 = {**SETUP_DEFAULTS, "train.adapter": "lora", "lora.rank": 8,
                "lora.targets": "experts", "lora.aggregation": "factors",
                "model.quantization": "nf4"}
    with pytest.raises(CalibrationError, match="train.adapter none, the run has lora"):
        full.check_fits("f" * 64, 16, 128, "one-pass", 48, lora_nf4)
    measured = Calibration.from_mapping({**json.loads(full.to_json()), "setup": lora_nf4})
    measured.check_fits("f" * 64, 16, 128, "one-pass", 48, lora_nf4)
    with pytest.raises(CalibrationError, match="lora.rank 8, the run has 16"):
        measured.check_fits("f" * 64, 16, 128, "one-pass", 48, {**lora_nf4, "lora.rank": 16})
    with pytest.raises(CalibrationError, match="model.quantization nf4, the run has none"):
        measured.check_fits("f" * 64, 16, 128, "one-pass", 48,
                            {**lora_nf4, "model.quantization": "none"})
    assert Calibration.from_mapping(json.loads(measured.to_json())) == measured
    # the run's side: what a config says, LoRA's keys only when it trains LoRA factors
    from hfedmoe.calibration import training_setup

    assert training_setup(parse_run_config({})) == SETUP_DEFAULTS
    assert training_setup(parse_run_config({"train.adapter": "lora", "lora.rank": 8,
                                            "model.quantization": "nf4"})) == lora_nf4
    assert training_setup(parse_run_config({"lora.rank": 4})) == SETUP_DEFAULTS


def test_bench_names_the_profiles_that_no_budget_makes_fast_enough():
    """`hfedmoe bench step`'s last line: a slow profile that gets the smallest budget because
    no measured budget steps within its speed says so; one that fits by time does not."""
    from hfedmoe.bench import format_profiles

    line = format_profiles(calibration(), min_budget=2)  # 0.84x at 6 experts and below
    assert "phone (speed 0.25) -> 2 (smallest: no budget steps that fast)" in line
    assert "laptop (speed 0.5) -> 2 (smallest: no budget steps that fast)" in line
    assert "workstation (speed 1) -> 48," in line  # fits by memory, no time limit
    fast = calibration(((6, 0.2, 100), (12, 0.45, 120), (48, 1.0, 200)))
    line = format_profiles(fast, min_budget=2)
    # by hand: 0.2 + 0.25 * (7 - 6) / 6 = 0.242 <= 0.25 < 0.283 at 8 experts;
    # 0.45 + 0.55 * (15 - 12) / 36 = 0.496 <= 0.5 < 0.511 at 16
    assert "phone (speed 0.25) -> 7, laptop (speed 0.5) -> 15, workstation" in line
