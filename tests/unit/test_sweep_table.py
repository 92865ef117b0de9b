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


def _setting(root: Path, method: str, clients: list[dict]) -> Path:
    import json

    stats = {"mean": 0.5, "std": 0.1}
    (root / method / "seed-0").mkdir(parents=True)
    (root / "comparison.json").write_text(json.dumps({"methods": {method: {
        "final_accuracy": stats, "best_accuracy": stats, "final_personal_accuracy": stats}}}))
    usage = [0.25] * 8  # 2 layers x 4 experts
    records = [{"round": 0, "clients": []},
               {"round": 1, "dominant_global": 8,
                "clients": [{"usage": usage, **c} for c in clients]}]
    (root / method / "seed-0" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    return root


def test_a_row_is_the_comparisons_method_with_diagnostics_only_for_the_hfedmoe_family(tmp_path):
    tool = _tool()
    hfedmoe = _setting(tmp_path / "default", "hfedmoe", [_client([4, 4], 0.6, 0.9)])
    assert tool.row(hfedmoe) == ["default", "0.500 ± 0.100", "0.500 ± 0.100", "0.500 ± 0.100",
                                 "1.00", "1.00", "0.600-0.600", "0.90"]
    fedalign = _setting(tmp_path / "fedalign.routing-weight=0.3", "fedalign",
                        [{"routing_consistency": 1.0}])
    assert tool.row(fedalign) == ["fedalign.routing-weight=0.3", "0.500 ± 0.100",
                                  "0.500 ± 0.100", "0.500 ± 0.100", "n/a", "n/a", "n/a", "n/a"]
