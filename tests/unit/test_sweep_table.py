"""tools/sweep_table.py: HFedMoE's aggregation diagnostics of a sweep, against hand counts."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("sweep_table", ROOT / "tools" / "sweep_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _client(dominant, gate, overlap):
    return {"dominant_per_layer": dominant, "gate_weight": gate, "selection_overlap": overlap}


def test_diagnostics_count_dominant_sets_gate_weights_and_overlap():
    records = [
        {"round": 0, "clients": []},  # the initial evaluation: no clients
        {"round": 1, "dominant_global": 8,  # 2 layers x 4 experts: S_global = all
         "clients": [_client([4, 4], 0.6, 0.9), _client([2, 3], 0.4, 0.7)]},
        {"round": 2, "dominant_global": 6,
         "clients": [_client([1, 2], 0.25, 1.0), _client([4, 4], 0.75, 0.8)]},
    ]
    got = _tool().diagnostics(records, num_experts=4)
    sizes = [4, 4, 2, 3, 1, 2, 4, 4]
    assert got["dominant_share"] == pytest.approx(sum(sizes) / (4 * len(sizes)))
    assert got["global_full_share"] == 0.5
    assert (got["gate_weight_min"], got["gate_weight_max"]) == (0.25, 0.75)
    assert got["overlap"] == pytest.approx(0.85)


def test_records_without_hfedmoe_diagnostics_are_refused():
    with pytest.raises(ValueError, match="no HFedMoE diagnostics"):
        _tool().diagnostics([{"round": 1, "clients": [{"client_id": 0}]}], num_experts=4)
    partial = _tool().diagnostics([{"round": 1, "clients": [{"dominant_per_layer": [2]}]}], 4)
    assert partial["dominant_share"] == 0.5 and math.isnan(partial["gate_weight_min"])
