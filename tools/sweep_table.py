"""The table of a hyper-parameter sweep written by tools/sweep.sh.

    python tools/sweep_table.py runs/sweep

One row per ``<root>/<bench>-<alpha>/<setting>/comparison.json``: the final, best and
personalised accuracy of its method (``hfedmoe``, or tools/sweep.sh's METHOD; mean ± std over
seeds, from comparison.json), and, for the HFedMoE family, what the setting made its
aggregation do, read from every seed's metrics.jsonl (``n/a`` for other methods):

* ``dominant share``: the mean over rounds, clients and layers of |S_c| / S, the share of a
  layer's experts in a client's dominant set (Eq. 16; 1.0 = every expert dominant);
* ``S_global = all``: the share of rounds whose S_global (the union of the S_c) holds every
  expert of every layer;
* ``alpha(c)``: the smallest and largest gate weight any client got in any round
  (Eqs. 19-21; 1/N each would be uniform);
* ``overlap``: the mean one-pass selection's overlap with the exact Eq. 15 set.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping


def diagnostics(records: Iterable[Mapping[str, Any]], num_experts: int) -> dict[str, float]:
    """HFedMoE's aggregation diagnostics of one run's round records (module docstring)."""
    shares, full, weights, overlaps = [], [], [], []
    for record in records:
        clients = record.get("clients") or []
        if record.get("round", 0) < 1 or not clients:
            continue
        layers = None
        for client in clients:
            dominant = client.get("dominant_per_layer")
            if dominant is None:
                continue
            shares += [size / num_experts for size in dominant]
            layers = len(dominant)
            if client.get("gate_weight") is not None:
                weights.append(float(client["gate_weight"]))
            if client.get("selection_overlap") is not None:
                overlaps.append(float(client["selection_overlap"]))
        if layers is not None and record.get("dominant_global") is not None:
            full.append(float(record["dominant_global"] == layers * num_experts))  # |S_global|
    if not shares:
        raise ValueError("no HFedMoE diagnostics (dominant_per_layer) in these records")
    return {"dominant_share": statistics.fmean(shares),
            "global_full_share": statistics.fmean(full) if full else float("nan"),
            "gate_weight_min": min(weights) if weights else float("nan"),
            "gate_weight_max": max(weights) if weights else float("nan"),
            "overlap": statistics.fmean(overlaps) if overlaps else float("nan")}


def _cell(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _num_experts(run: Path) -> int:
    """Experts per MoE layer of a run (the usage grid of its first client record)."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for client in record.get("clients") or []:
            if client.get("usage") and client.get("dominant_per_layer"):
                return len(client["usage"]) // len(client["dominant_per_layer"])
    raise ValueError(f"{run}: no client usage in metrics.jsonl")


def row(setting_dir: Path) -> list[str]:
    """One table row of a setting: the accuracies of the comparison's one method
    (tools/sweep.sh's METHOD) and, for the HFedMoE family, its aggregation diagnostics
    ("n/a" for a method that records none, e.g. fedalign)."""
    comparison = json.loads((setting_dir / "comparison.json").read_text())
    [(method, stats)] = comparison["methods"].items()
    accuracies = [setting_dir.name, _cell(stats["final_accuracy"]),
                  _cell(stats.get("best_accuracy")), _cell(stats.get("final_personal_accuracy"))]
    per_seed = []
    for run in sorted((setting_dir / method).glob("seed-*")):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        try:
            per_seed.append(diagnostics(records, _num_experts(run)))
        except ValueError:  # no dominant sets: not an HFedMoE-family method
            return accuracies + ["n/a"] * 4

    def mean(key: str) -> float:
        return statistics.fmean(d[key] for d in per_seed)

    return accuracies + [
        f"{mean('dominant_share'):.2f}", f"{mean('global_full_share'):.2f}",
        f"{min(d['gate_weight_min'] for d in per_seed):.3f}-"
        f"{max(d['gate_weight_max'] for d in per_seed):.3f}",
        f"{mean('overlap'):.2f}"]


def table(root: Path) -> str:
    head = ["setting", "final accuracy", "best accuracy", "personalised", "dominant share",
            "S_global = all", "alpha(c)", "overlap"]
    lines = []
    for bench in sorted(p for p in root.iterdir() if p.is_dir()):
        lines += [f"**{bench.name}**", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        settings = sorted((p for p in bench.iterdir() if (p / "comparison.json").is_file()),
                          key=lambda p: (p.name != "default", p.name))
        lines += ["| " + " | ".join(row(p)) + " |" for p in settings]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweep")))
