"""Budgets calibrated on the model: measured step time and peak memory against the budget.

The analytic cost model (hfedmoe.budget) assumes that a device k times slower than the
reference affords 1/k of the experts, and estimates memory from tensor sizes. Neither holds
on a real model: the forward, the frozen attention's and routers' backward and the optimizer
step do not shrink with the budget, so step time has a floor well above zero (on MiniLM-MoE
a budget of 6 of 48 experts still costs 0.84x of full training), and peak memory is what the
allocator saw, not a sum of tensor sizes. A calibration replaces both with figures measured
by ``hfedmoe bench step --json FILE`` on the same model and batch shape:

* time: a device of relative speed ``s`` < 1 (hfedmoe.budget.DeviceProfile) gets the largest
  budget whose measured step-time ratio to full training is <= ``s``, so that its local round
  takes no longer than the reference device's full-training round (``s`` >= 1: no limit). When even the smallest
  budget is slower (``s`` below the floor), it gets the smallest budget the model allows and
  the shortfall is reported (time stays a soft limit, as in the analytic model);
* memory: the largest budget whose measured peak training memory, plus a headroom of
  ``MEMORY_HEADROOM`` (5%) of it, fits the profile's memory (a hard limit; a profile that
  cannot hold the smallest budget is refused). The headroom is there because the bench
  measures client 0's batches and a run's clients see others: which tokens reach the learning
  experts, and each batch's longest text, move the peak from batch to batch (measured: +0.6%
  on the tiny LoRA/nf4 model's clients over its bench figure at the same budget).

Between measured budgets both figures are interpolated linearly; below the smallest measured
budget the smallest's figures apply (conservative: the figures grow with the budget), so
measure the budgets that matter (the floor: bench's ``floor_flops_ratio``, the step FLOPs
when no expert learns, is printed and stored with the calibration).

A run stores the calibration it used as ``<out>/calibration.json`` and its fingerprint in
``inputs.json``; the server sends it to clients inside the train instruction (deployment
SuperNodes need no copy of the file).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from hfedmoe.config import RunConfig


MEMORY_HEADROOM = 0.05  # share of a measured peak kept free (module docstring)


class CalibrationError(ValueError):
    """A calibration file that cannot be read or does not fit the run (one line)."""


# What a client's step trains and holds besides the model and the batch shape: a calibration
# measured with full expert training says nothing about a LoRA client on a 4-bit base (its
# peak is a fraction of it), so each of these must match the run. Files written before a key
# existed were measured with its value here (the only setting there was then).
SETUP_DEFAULTS = {"train.adapter": "none", "lora.rank": 0, "lora.targets": "",
                  "lora.aggregation": "", "model.quantization": "none",
                  "budget.optimizer-state": "batch", "model.trainable-non-expert": "head",
                  "model.precision": "fp32", "model.device": "cpu"}


def training_setup(config: "RunConfig") -> dict[str, str | int]:
    """The config keys (beyond model, batch shape and ``budget.mode``) that change a step's
    time and memory, with the run's values; LoRA's keys only when ``train.adapter`` is
    "lora". ``model.precision`` is resolved ("auto" -> what the device runs), and
    ``model.device`` is its kind ("cpu" or "cuda")."""
    from hfedmoe.model.loading import autocast_dtype

    lora = config.train.adapter == "lora"
    return {"train.adapter": config.train.adapter,
            "lora.rank": config.lora.rank if lora else 0,
            "lora.targets": config.lora.targets if lora else "",
            "lora.aggregation": config.lora.aggregation if lora else "",
            "model.quantization": config.model.quantization,
            "budget.optimizer-state": config.budget.optimizer_state,
            "model.trainable-non-expert": config.model.trainable_non_expert,
            "model.precision": "fp32" if autocast_dtype(config.model.precision,
                                                        config.model.device) is None
            else "bf16-mixed",
            "model.device": config.model.device.split(":")[0]}


@dataclass(frozen=True)
class CalibrationPoint:
    budget: int  # C_budget, experts over all MoE layers
    step_time_ratio: float  # measured step time / full training's, same run
    peak_memory_bytes: int  # measured peak training memory (hfedmoe.measurement)


@dataclass(frozen=True)
class Calibration:
    """Measured points, sorted by budget, the full budget (ratio 1.0) last.

    ``model_fingerprint`` (hfedmoe.fingerprint.model_fingerprint), ``batch_size``,
    ``max_length``, ``budget_mode`` and ``setup`` (:func:`training_setup`: adapter, LoRA rank,
    quantization, ...) say what was measured; :meth:`check_fits` refuses a run that differs.
    """

    model: str
    model_fingerprint: str
    batch_size: int
    max_length: int
    budget_mode: str
    total_experts: int
    floor_flops_ratio: float  # step FLOPs when no expert learns / full training's
    points: tuple[CalibrationPoint, ...]
    setup: tuple[tuple[str, str | int], ...] = tuple(SETUP_DEFAULTS.items())

    def __post_init__(self) -> None:
        budgets = [p.budget for p in self.points]
        if not self.points or budgets != sorted(set(budgets)):
            raise CalibrationError("calibration points must have distinct budgets in order")
        if budgets[-1] != self.total_experts:
            raise CalibrationError(f"calibration has no point at the full budget "
                                   f"({self.total_experts} experts)")
        for p in self.points:
            if not (p.step_time_ratio > 0 and math.isfinite(p.step_time_ratio)) \
                    or p.peak_memory_bytes <= 0 or p.budget < 1:
                raise CalibrationError(f"calibration point {p} is not a measurement")

    def step_time_ratio(self, budget: int) -> float:
        """Step time at ``budget`` as a ratio to full training (interpolated, monotone)."""
        return self._at(budget, [p.step_time_ratio for p in self.points])

    def peak_memory_bytes(self, budget: int) -> int:
        """Peak training memory at ``budget``, bytes (interpolated, monotone)."""
        return math.ceil(self._at(budget, [float(p.peak_memory_bytes) for p in self.points]))

    def _at(self, budget: int, values: Sequence[float]) -> float:
        # the running maximum: a larger budget never counts as cheaper than a smaller one
        # (measurement noise can make two neighbouring points cross)
        envelope = [max(values[: i + 1]) for i in range(len(values))]
        budgets = [p.budget for p in self.points]
        if budget <= budgets[0]:
            return envelope[0]
        for (b0, v0), (b1, v1) in zip(zip(budgets, envelope), zip(budgets[1:], envelope[1:])):
            if budget <= b1:
                return v0 + (v1 - v0) * (budget - b0) / (b1 - b0)
        return envelope[-1]

    def fast_enough(self, budget: int, relative_speed: float) -> bool:
        """Whether a device at ``relative_speed`` (1 = the reference) steps at ``budget`` within
        its share of full training's time: measured step-time ratio <= speed (always at
        speed >= 1)."""
        return relative_speed >= 1.0 or self.step_time_ratio(budget) <= relative_speed + 1e-9

    def budget_for(self, memory_bytes: int, relative_speed: float, min_budget: int,
                   name: str = "device") -> int:
        """C_budget of a device (module docstring): its measured peak plus
        ``MEMORY_HEADROOM`` fits ``memory_bytes``; raises CalibrationError when ``min_budget``
        experts do not fit."""
        fits = [c for c in range(min_budget, self.total_experts + 1)
                if self.peak_memory_bytes(c) * (1 + MEMORY_HEADROOM) <= memory_bytes]
        if not fits:
            raise CalibrationError(
                f"device profile '{name}' has {memory_bytes} bytes but training {min_budget} "
                f"expert(s) measured {self.peak_memory_bytes(min_budget)} bytes at peak "
                f"(+{MEMORY_HEADROOM:.0%} headroom; calibration of {self.model})")
        by_time = [c for c in fits if self.fast_enough(c, relative_speed)]
        return max(by_time) if by_time else min(fits)

    def check_fits(self, model_fingerprint: str, batch_size: int, max_length: int,
                   budget_mode: str, total_experts: int,
                   setup: Mapping[str, str | int] | None = None) -> None:
        """Raise CalibrationError naming the first difference from the run (``setup``:
        :func:`training_setup` of the run; None = the defaults)."""
        expected = {"model fingerprint": (self.model_fingerprint, model_fingerprint),
                    "train.batch-size": (self.batch_size, batch_size),
                    "model.max-length": (self.max_length, max_length),
                    "budget.mode": (self.budget_mode, budget_mode),
                    "total experts": (self.total_experts, total_experts)}
        measured_setup = dict(self.setup)
        for key, run_value in {**SETUP_DEFAULTS, **(setup or {})}.items():
            expected[key] = (measured_setup.get(key, SETUP_DEFAULTS[key]), run_value)
        for what, (measured, run) in expected.items():
            if measured != run:
                shown = (str(measured)[:16], str(run)[:16])
                raise CalibrationError(f"the calibration was measured with {what} "
                                       f"{shown[0]}, the run has {shown[1]}; measure it again "
                                       f"with `hfedmoe bench step --json` on this run's settings")

    def to_json(self) -> str:
        data = asdict(self)
        data["setup"] = dict(self.setup)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Mapping) -> "Calibration":
        try:
            points = tuple(CalibrationPoint(int(p["budget"]), float(p["step_time_ratio"]),
                                            int(p["peak_memory_bytes"])) for p in data["points"])
            stored = data.get("setup", {})  # absent: written before the setup was recorded
            setup = tuple((key, type(default)(stored.get(key, default)))
                          for key, default in SETUP_DEFAULTS.items())
            return cls(str(data["model"]), str(data["model_fingerprint"]),
                       int(data["batch_size"]), int(data["max_length"]),
                       str(data["budget_mode"]), int(data["total_experts"]),
                       float(data["floor_flops_ratio"]), points, setup)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"not a calibration ({type(exc).__name__}: {exc})") from None


def from_bench(meta: Mapping, rows: Sequence[Mapping]) -> Calibration:
    """The calibration in a ``hfedmoe bench step --json`` file's ``meta`` and ``rows``.

    Full training and a budget covering every expert may both be measured: full training
    (the reference, ratio 1.0, listed first) is kept."""
    try:
        by_budget: dict[int, Mapping] = {}
        for row in rows:
            by_budget.setdefault(int(row["budget"]), row)
        points = [by_budget[budget] for budget in sorted(by_budget)]
        return Calibration.from_mapping({**meta, "points": points})
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CalibrationError):
            raise
        raise CalibrationError(f"not a `hfedmoe bench step --json` file "
                               f"({type(exc).__name__}: {exc})") from None


def load_calibration(path: str | Path) -> Calibration:
    """Read a ``hfedmoe bench step --json`` file (or a stored ``calibration.json``); raises
    CalibrationError, one line starting with the file's path."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read it "
                               f"({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: not JSON ({exc})") from None
    try:
        if isinstance(data, dict) and "points" in data:
            return Calibration.from_mapping(data)
        if isinstance(data, dict) and "meta" in data and "rows" in data:
            return from_bench(data["meta"], data["rows"])
        raise CalibrationError("not a `hfedmoe bench step --json` file (no meta and rows)")
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None
