"""``hfedmoe bench step``: what a budget saves, measured side by side in one process.

Trains one client (partition 0 of the configured run) for a few local steps at full training
(every routed expert back-propagates, plain autograd) and under HFedMoE's selection at each
given budget, interleaving the configurations over several repeats so that machine noise hits
them alike. Reports the median step time and the peak training memory (see
hfedmoe.measurement), each as a ratio to full training.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from hfedmoe.client import build_model, client_datasets, local_settings
from hfedmoe.config import RunConfig
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.strategies import method_for
from hfedmoe.training import train_locally


@dataclass(frozen=True)
class BenchRow:
    label: str
    budget_experts: int  # C_budget (total experts for full training)
    max_active_experts_per_batch: int  # measured
    step_seconds: float  # median over repeats of the mean step time
    peak_memory_bytes: int
    step_ratio: float  # to full training
    memory_ratio: float  # to full training


def bench_step(config: RunConfig, budgets: list[int], steps: int, repeats: int) -> list[BenchRow]:
    client = client_datasets(config, partition_id=0)
    data = client.train
    adapter = build_model(config, client.num_labels)
    params = set_trainable(adapter, config.model.trainable_non_expert)
    initial = read_state(params)
    total = adapter.geometry.total_experts
    method = method_for(replace(config, method="hfedmoe"))
    modes = [("full training", total, None)] + [
        (f"hfedmoe budget {b}", b, method.selector(b, adapter.geometry, config.seed))
        for b in budgets]
    settings = local_settings(config, config.seed, local_steps=steps)
    train_locally(adapter, list(params.values()), data, settings, None)  # warm-up
    samples: dict[str, list] = {label: [] for label, _, _ in modes}
    for _ in range(repeats):
        for label, _, selector in modes:
            write_state(params, initial)
            samples[label].append(train_locally(adapter, list(params.values()), data, settings,
                                                selector))
    rows = []
    for label, budget, _ in modes:
        results = samples[label]
        rows.append((label, budget, max(r.max_active_experts_per_batch for r in results),
                     statistics.median(r.mean_step_seconds for r in results),
                     max(r.peak_memory_bytes for r in results)))
    full_time, full_memory = rows[0][3], rows[0][4]
    return [BenchRow(label, budget, active, seconds, memory, seconds / full_time,
                     memory / full_memory)
            for label, budget, active, seconds, memory in rows]


def format_rows(rows: list[BenchRow]) -> str:
    header = (f"{'configuration':<22}{'budget':>7}{'max active':>11}{'step s':>9}"
              f"{'x full':>8}{'peak MiB':>10}{'x full':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.label:<22}{row.budget_experts:>7}{row.max_active_experts_per_batch:>11}"
                     f"{row.step_seconds:>9.3f}{row.step_ratio:>8.2f}"
                     f"{row.peak_memory_bytes / 2**20:>10.1f}{row.memory_ratio:>8.2f}")
    return "\n".join(lines)
