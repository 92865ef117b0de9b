"""Many clients: does a round cost what its sampled clients cost? (issue "Many clients", item 5)

    .venv/bin/python tools/bench_scale.py [--config FILE] [--clients 10,100,1000]
        [--sampled 10] [--rounds 2] [--set KEY=VALUE ...] [--json FILE]

For each number N of connected clients, one ``hfedmoe run`` process trains ``--rounds`` rounds
with K = ``--sampled`` clients sampled per round for training and for personalised
evaluation (``train.fraction-train`` = ``train.fraction-evaluate`` = K / N, IID partitions of
the same corpus), everything else as the configuration says. The runs go one after another
in this one invocation (side by side on the same machine); each is a fresh process, so its
peak resident memory (``os.wait4``) is its own: the server's, and in the in-process runtime
the clients' too. Per N it prints the mean round time of the rounds after the first (round 1
also builds and caches the client-side model), the bytes per round (train and evaluate, both
ways) and the peak memory, as a Markdown table (and JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hfedmoe.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run_one(config: list[str], clients: int, sampled: int, rounds: int, extra: list[str],
            out: Path) -> dict:
    """One ``hfedmoe run`` with N = ``clients``; returns its measurements."""
    fraction = min(1.0, sampled / clients)
    sets = {"data.num-clients": clients, "train.fraction-train": fraction,
            "train.fraction-evaluate": fraction, "data.partition": "iid",
            "num-server-rounds": rounds, "checkpoint.every": 0}
    command = [sys.executable, "-m", "hfedmoe.cli", "run", *config, "--out", str(out)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    for assignment in extra:
        command += ["--set", assignment]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"N = {clients}: hfedmoe run failed:\n{stderr[-2000:]}")
    records = [r for r in read_metrics(out) if r["round"] > 0]
    later = records[1:] or records
    return {
        "clients": clients,
        "sampled": max(1, round(fraction * clients)),
        "trained_per_round": statistics.mean(len(r["clients"]) for r in records),
        "evaluated_per_round": statistics.mean(len(r.get("personal", [])) for r in records),
        "round_seconds": statistics.mean(r["round_seconds"] for r in later),
        "first_round_seconds": records[0]["round_seconds"],
        "mib_down_per_round": statistics.mean(r["bytes_down"] for r in records) / 2**20,
        "mib_up_per_round": statistics.mean(r["bytes_up"] for r in records) / 2**20,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
    }


def table(rows: list[dict]) -> str:
    lines = ["| connected N | sampled K | trained / evaluated per round | round s (after round 1) "
             "| round 1 s | MiB down / round | MiB up / round | peak memory MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['sampled']} | {r['trained_per_round']:.0f} / "
                     f"{r['evaluated_per_round']:.0f} | {r['round_seconds']:.1f} | "
                     f"{r['first_round_seconds']:.1f} | {r['mib_down_per_round']:.1f} | "
                     f"{r['mib_up_per_round']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="TOML file(s), in order")
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = [item for path in args.config for item in ("--config", path)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for clients in (int(n) for n in args.clients.split(",")):
            rows.append(run_one(config, clients, args.sampled, args.rounds, args.sets,
                                Path(tmp) / f"n{clients}"))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
