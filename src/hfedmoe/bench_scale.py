"""``hfedmoe bench scale``: does a round cost what its sampled clients cost? (many clients)

For each runtime and each number N of connected clients, one ``hfedmoe run`` process trains
``rounds`` rounds with K = ``sampled`` clients sampled per round for training and for
personalised evaluation (``train.fraction-train`` = ``train.fraction-evaluate`` = K / N, IID
partitions of the same corpus), everything else as the configuration says. The runs go one
after another (side by side on the same machine), each a fresh process so that its memory is
its own. Per run (:func:`measure_run`):

* ``round_seconds``: the mean round time of the rounds after the first (round 1 also builds
  and caches the client-side model, and Ray starts its actors), ``first_round_seconds``;
* ``mib_down_per_round`` / ``mib_up_per_round``: every message's arrays (train and evaluate
  instructions down, uploads up), MiB;
* ``server_peak_mib``: the server process's peak resident memory (the round records'
  ``server_peak_resident_bytes``; in-process, the clients run in that process too);
* ``server_cpu_seconds_per_round``: the CPU time the server process used per round after the
  first (every thread: on Ray that includes Flower's simulation engine, which polls nodes; a
  measure that does not depend on how busy the machine is);
* ``client_process_peak_mib``: the client processes' peak resident memory (max over replies of
  ``process_peak_resident_bytes``: a Ray actor's lifetime peak, all its clients included);
* ``client_process_resident_mib_by_round``: their resident memory after each round (max over
  that round's replies), which shows memory that creeps from round to round.

Measured figures and their reading: docs/scaling.md.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from hfedmoe.report import read_metrics

MIB = 2**20


class BenchRunError(RuntimeError):
    """One ``hfedmoe run`` of the benchmark failed; the message ends with its stderr tail."""


def run_settings(runtime: str, clients: int, sampled: int, rounds: int) -> dict[str, object]:
    """The config keys one benchmark run sets (after the user's ``--config``/``--set``)."""
    fraction = min(1.0, sampled / clients)
    return {"data.num-clients": clients, "train.fraction-train": fraction,
            "train.fraction-evaluate": fraction, "data.partition": "iid",
            "num-server-rounds": rounds, "checkpoint.every": 0, "simulation.runtime": runtime}


def measure_run(config_files: Sequence[str], overrides: Sequence[str], runtime: str,
                clients: int, sampled: int, rounds: int, out: Path) -> dict:
    """Run ``hfedmoe run`` once in a fresh process (N = ``clients`` on ``runtime``) and
    return its measurements (module docstring). Raises :class:`BenchRunError` if it fails."""
    command = [sys.executable, "-m", "hfedmoe.cli", "run", "--out", str(out)]
    for path in config_files:
        command += ["--config", str(path)]
    for assignment in overrides:
        command += ["--set", assignment]
    for key, value in run_settings(runtime, clients, sampled, rounds).items():
        command += ["--set", f"{key}={value}"]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise BenchRunError(f"{runtime}, N = {clients}: hfedmoe run exited "
                            f"{done.returncode}:\n{done.stderr[-2000:]}")
    records = [r for r in read_metrics(out) if r["round"] > 0]
    later = records[1:] or records
    clients_of = [r["clients"] for r in records]
    return {
        "runtime": runtime,
        "clients": clients,
        "sampled": max(1, round(min(1.0, sampled / clients) * clients)),
        "trained_per_round": statistics.mean(len(c) for c in clients_of),
        "evaluated_per_round": statistics.mean(len(r.get("personal") or []) for r in records),
        "round_seconds": statistics.mean(r["round_seconds"] for r in later),
        "first_round_seconds": records[0]["round_seconds"],
        "mib_down_per_round": statistics.mean(r["bytes_down"] for r in records) / MIB,
        "mib_up_per_round": statistics.mean(r["bytes_up"] for r in records) / MIB,
        "server_peak_mib": max(r["server_peak_resident_bytes"] for r in records) / MIB,
        "server_cpu_seconds_per_round": (
            (records[-1]["server_cpu_seconds"] - records[0]["server_cpu_seconds"])
            / (len(records) - 1) if len(records) > 1 else records[0]["server_cpu_seconds"]),
        "client_process_peak_mib": max((c["process_peak_resident_bytes"]
                                        for cs in clients_of for c in cs), default=0) / MIB,
        "client_process_resident_mib_by_round": [
            max((c["process_resident_bytes"] for c in cs), default=0) / MIB
            for cs in clients_of],
    }


def format_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| runtime | connected N | sampled K | trained / evaluated per round "
             "| round s (after round 1) | round 1 s | MiB down / round | MiB up / round "
             "| server peak MiB | server CPU s / round | client process peak MiB "
             "| client process resident MiB by round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by_round = " → ".join(f"{m:.0f}" for m in r["client_process_resident_mib_by_round"])
        lines.append(f"| {r['runtime']} | {r['clients']} | {r['sampled']} | "
                     f"{r['trained_per_round']:.0f} / {r['evaluated_per_round']:.0f} | "
                     f"{r['round_seconds']:.1f} | {r['first_round_seconds']:.1f} | "
                     f"{r['mib_down_per_round']:.1f} | {r['mib_up_per_round']:.1f} | "
                     f"{r['server_peak_mib']:.0f} | {r['server_cpu_seconds_per_round']:.1f} | "
                     f"{r['client_process_peak_mib']:.0f} | "
                     f"{by_round} |")
    return "\n".join(lines)
