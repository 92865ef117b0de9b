"""``hfedmoe bench step``: what a budget saves, measured side by side in one process.

Trains one client (partition 0 of the configured run) for a few local steps at full training
(every routed expert back-propagates, plain autograd) and under HFedMoE's selection at each
given budget (``budget.mode`` of the configuration), interleaving the configurations over
several repeats, in an order rotated by one each repeat (a configuration run late in a repeat
measured up to 7% slower than the same one run first), so that machine noise and position hit
them alike; a number of repeats that is a multiple of the configurations balances fully. Per budget it reports, each as a ratio
to full training measured in the same run:

- ``step_time_ratio``: median over repeats of the mean step time;
- ``peak_memory_ratio``: peak training memory as the allocator measured it
  (hfedmoe.measurement.AllocatorPeak: on CPU one steady-state step of each repeat profiled,
  the largest over repeats); ``peak_memory_estimate_ratio``: the tensor-accounting estimate;
- ``backward_flops_ratio``: exact backward FLOPs of one counted step on the same batch
  (torch's FLOP counter, :func:`hfedmoe.measurement.flop_counter`);
- ``active_slot_share``: the share of the batch's routed token-slots that go to experts that
  learn (the importance ranking picks busy experts, so it exceeds budget / total experts);
- ``ideal_ratio``: the step FLOPs the method allows: the forward is unchanged (every routed
  expert runs) and only the expert backward shrinks, to ``active_slot_share`` of full
  training's: ``(F + B_0 + share * (B_full - B_0)) / (F + B_full)`` with F the forward FLOPs,
  B_full full training's backward and B_0 the backward when no expert learns;
- ``expert_backward_flops_ratio``: ``(B_C - B_0) / (B_full - B_0)``, to compare with the share;
- ``trainable_state_ratio``: gradient + optimizer-state bytes held at the end of a step (the
  ideal is the budget's share of the expert state plus the rest).
"""

from __future__ import annotations

import json
import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hfedmoe.budget import PRESETS
from hfedmoe.calibration import Calibration, CalibrationError, from_bench
from hfedmoe.client import build_model, client_datasets, local_settings
from hfedmoe.config import RunConfig
from hfedmoe.data import batches
from hfedmoe.measurement import flop_counter, gradient_bytes, optimizer_state_bytes
from hfedmoe.model import MoEAdapter, OnlinePlan
from hfedmoe.model.state import read_state, set_trainable, write_state
from hfedmoe.strategies import method_for
from hfedmoe.tasks import task_for
from hfedmoe.tasks.classification import classification_loss
from hfedmoe.training import (
    TaskLoss,
    OnlineSelector,
    forward_batch,
    make_optimizer,
    train_locally,
    trace_counts,
    trains_every_routed_expert,
)


@dataclass(frozen=True)
class BenchRow:
    label: str
    budget: int  # C_budget (total experts for full training)
    max_active_experts_per_batch: int  # measured
    step_seconds: float  # median over repeats of the mean step time
    peak_memory_bytes: int  # measured (allocator)
    peak_memory_estimate_bytes: int  # tensor accounting (hfedmoe.measurement)
    backward_flops: int  # one counted step
    active_slot_share: float  # routed token-slots of experts that learn / all routed slots
    step_time_ratio: float  # to full training
    peak_memory_ratio: float
    peak_memory_estimate_ratio: float
    backward_flops_ratio: float
    expert_backward_flops_ratio: float
    ideal_ratio: float
    trainable_state_ratio: float


@dataclass(frozen=True)
class StepCount:
    forward_flops: int
    backward_flops: int
    active_slot_share: float
    trainable_state_bytes: int  # gradients + optimizer moments after one step


@dataclass(frozen=True)
class BenchReport:
    rows: list[BenchRow]  # full training first, then each budget
    floor_flops_ratio: float  # step FLOPs when no expert learns / full training's (the floor)
    total_experts: int
    min_budget: int  # the model's top-k: the smallest budget a client can have


def bench_step(config: RunConfig, budgets: list[int], steps: int, repeats: int) -> BenchReport:
    """Rows for full training and each budget (module docstring), and the floor: the step
    FLOPs ratio no budget goes below on this model (forward, the frozen attention's and
    routers' backward, the head: everything but the experts' backward)."""
    loss_fn = task_for(config.task).loss
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
    device = next(adapter.model.parameters()).device
    batch = {name: tensor.to(device) for name, tensor in
             next(batches(data, config.train.batch_size, torch.Generator().manual_seed(0))).items()}
    counts = {}
    for label, budget, selector in [*modes, ("no expert learns", 0, None)]:
        write_state(params, initial)
        counts[label] = count_step(adapter, list(params.values()), batch, selector, budget,
                                   config.budget.mode, loss_fn)
    write_state(params, initial)
    train_locally(adapter, list(params.values()), data, settings, None, loss_fn)  # warm-up
    samples: dict[str, list] = {label: [] for label, _, _ in modes}
    for repeat in range(repeats):  # rotated: each configuration takes each place in turn
        shift = repeat % len(modes)
        for label, _, selector in modes[shift:] + modes[:shift]:
            write_state(params, initial)
            samples[label].append(train_locally(adapter, list(params.values()), data, settings,
                                                selector, loss_fn))
    full, none = counts["full training"], counts["no expert learns"]
    full_results = samples["full training"]
    full_time = statistics.median(r.mean_step_seconds for r in full_results)
    full_memory = max(r.peak_memory_bytes for r in full_results)
    full_estimate = max(r.peak_memory_estimate_bytes for r in full_results)
    expert_full = full.backward_flops - none.backward_flops
    rows = []
    for label, budget, _ in modes:
        results, count = samples[label], counts[label]
        seconds = statistics.median(r.mean_step_seconds for r in results)
        memory = max(r.peak_memory_bytes for r in results)
        estimate = max(r.peak_memory_estimate_bytes for r in results)
        ideal = ((full.forward_flops + none.backward_flops
                  + count.active_slot_share * expert_full)
                 / (full.forward_flops + full.backward_flops))
        rows.append(BenchRow(
            label, budget, max(r.max_active_experts_per_batch for r in results), seconds, memory,
            estimate, count.backward_flops, count.active_slot_share, seconds / full_time,
            memory / full_memory, estimate / full_estimate,
            count.backward_flops / full.backward_flops,
            (count.backward_flops - none.backward_flops) / expert_full if expert_full else 1.0,
            ideal, count.trainable_state_bytes / full.trainable_state_bytes))
    floor = ((full.forward_flops + none.backward_flops)
             / (full.forward_flops + full.backward_flops))
    return BenchReport(rows, floor, total, min(adapter.geometry.top_k, total))


def count_step(adapter: MoEAdapter, trainable: list[torch.nn.Parameter],
               batch: dict[str, torch.Tensor], selector, budget: int, mode: str,
               loss_fn: TaskLoss = classification_loss) -> StepCount:
    """FLOPs of one training step on ``batch`` (forward and backward counted apart), the
    share of routed token-slots whose expert learns, and the trainable state held after the
    step (fresh AdamW, one step; the parameters are restored afterwards). A ``selector`` that
    trains every routed expert (or None): plain autograd; else ``mode`` as ``budget.mode``.
    ``budget`` 0: no expert learns, whatever the selector (one pass). ``loss_fn``: the task's
    loss (hfedmoe.tasks)."""
    model, geometry = adapter.model, adapter.geometry
    mask = batch["attention_mask"]
    optimizer = make_optimizer(trainable, lr=1e-4)
    plain = trains_every_routed_expert(selector)
    nobody = torch.zeros(geometry.num_experts, dtype=torch.bool)
    model.train()
    with adapter.trace_routing() as trace:
        if budget == 0:
            context = adapter.budgeted_experts(lambda layer: nobody)
        elif plain:
            context = nullcontext()
        elif mode == "one-pass" and isinstance(selector, OnlineSelector):
            context = adapter.budgeted_experts(selector.layer_chooser(trace, mask))
        else:
            context = adapter.deferred_expert_backward()
        with flop_counter() as forward, context as plan:
            loss = loss_fn(forward_batch(model, batch), batch["labels"])
        routed = trace_counts(trace, mask, geometry.num_experts).to(torch.float64)  # (L, S)
        if isinstance(plan, OnlinePlan):
            active = plan.active(geometry.num_layers, geometry.num_experts)
        elif plain:
            active = routed > 0
        else:
            plan.active = active = selector(trace, mask).active.cpu()
    with flop_counter() as backward:
        loss.backward()
    before = [p.detach().clone() for p in trainable]
    optimizer.step()
    held = gradient_bytes(trainable) + optimizer_state_bytes(optimizer)
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # the model leaves as it came
        for param, value in zip(trainable, before):
            param.copy_(value)
    model.eval()
    share = float(routed[active].sum() / routed.sum())
    return StepCount(forward.total, backward.total, share, held)


def write_json(report: BenchReport, path: Path, meta: dict) -> None:
    """``{"meta": ..., "rows": [{"budget": int, "step_time_ratio": float, ...}, ...]}``; meta
    also holds ``floor_flops_ratio`` and ``total_experts`` (the file is a budget calibration:
    ``budget.calibration``, hfedmoe.calibration)."""
    meta = {**meta, "floor_flops_ratio": report.floor_flops_ratio,
            "total_experts": report.total_experts}
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in report.rows]},
                               indent=2) + "\n")


def calibration_of(report: BenchReport, meta: dict) -> Calibration:
    """The budget calibration (hfedmoe.calibration) that ``report`` measured."""
    return from_bench({**meta, "floor_flops_ratio": report.floor_flops_ratio,
                       "total_experts": report.total_experts},
                      [asdict(row) for row in report.rows])


def format_profiles(calibration: Calibration, min_budget: int) -> str:
    """The budget each preset device profile gets under ``calibration`` (one line). A slow
    profile (speed s < 1) that no budget lets step within s times full training's time gets
    the smallest budget (hfedmoe.calibration) and is marked so: its rounds will be slower
    than the reference device's."""
    parts = []
    for name, profile in PRESETS.items():
        speed = profile.relative_speed
        try:
            budget = calibration.budget_for(profile.memory_bytes, speed, min_budget, name)
        except CalibrationError:
            parts.append(f"{name} (speed {speed:g}) -> does not fit")
            continue
        parts.append(f"{name} (speed {speed:g}) -> {budget}"
                     + ("" if calibration.fast_enough(budget, speed)
                        else " (smallest: no budget steps that fast)"))
    return "budgets of the device profiles with this calibration: " + ", ".join(parts)


def format_rows(rows: list[BenchRow]) -> str:
    header = (f"{'configuration':<22}{'budget':>7}{'active':>7}{'step s':>8}{'x full':>7}"
              f"{'ideal':>7}{'bwd FLOPs':>10}{'slots':>7}{'peak MiB':>9}{'x full':>7}"
              f"{'estim.':>7}{'state':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.label:<22}{row.budget:>7}{row.max_active_experts_per_batch:>7}"
                     f"{row.step_seconds:>8.3f}{row.step_time_ratio:>7.2f}{row.ideal_ratio:>7.2f}"
                     f"{row.backward_flops_ratio:>10.2f}{row.active_slot_share:>7.2f}"
                     f"{row.peak_memory_bytes / 2**20:>9.1f}{row.peak_memory_ratio:>7.2f}"
                     f"{row.peak_memory_estimate_ratio:>7.2f}{row.trainable_state_ratio:>7.2f}")
    return "\n".join(lines)
