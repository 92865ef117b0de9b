"""Device profiles and the cost model that turn a client's resources into C_budget (pure).

method.md section 2: client c may let at most C_budget(c) experts receive gradients per local
batch. A budget is given per client either directly (an integer) or as a device profile
(memory, relative speed) that the cost model below converts:

    memory:  base_bytes + C * cost.total_bytes <= profile.memory_bytes      (hard limit)
    time:    C <= floor(relative_speed * total_experts)  when relative_speed < 1   (soft)
    C_budget = clip(min(C_memory, C_time, total_experts), min_budget, total_experts)

With a calibration (``budget.calibration``, hfedmoe.calibration) both limits use figures
measured on the model instead: the largest C whose measured peak memory fits, and within it
the largest C whose measured step time, as a ratio to full training, is <= relative_speed.

Time model without a calibration (our definition): the reference device (relative_speed = 1.0) can afford the backward
work of every expert within a round's time; a device k times slower affords 1/k of it. Devices at
speed >= 1 have no time limit. Memory is a hard limit (a profile that cannot hold ``min_budget``
experts raises); time is soft (it never pushes C below ``min_budget``).

Spec strings (one scalar config value for all clients, or one SuperNode's node config value):
comma-separated entries, client ``i`` takes entry ``i % len(entries)``. An entry is
  ``4``                      a direct budget (experts, >= 1; more than all experts means all)
  ``all``                    every expert (no budget)
  ``laptop``                 a preset profile (see PRESETS)
  ``mem=2GiB:speed=0.5``     a custom profile (speed defaults to 1.0)
  ``laptop:mem=8GiB``        a preset with overrides
Sizes: bytes, or a number with B, kB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from hfedmoe.calibration import Calibration

GIB = 1024**3
_UNITS = MappingProxyType({"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                           "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
ALL = "all"


@dataclass(frozen=True)
class DeviceProfile:
    """A client device: memory available for training and compute speed.

    ``relative_speed`` is relative to the reference device (1.0), the one that can train every
    expert within a round; 0.5 = twice as slow.
    """

    name: str
    memory_bytes: int
    relative_speed: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("device profile needs a non-empty name")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) \
                or self.memory_bytes <= 0:
            raise ValueError(f"device profile '{self.name}': memory_bytes must be an integer > 0, "
                             f"got {self.memory_bytes!r}")
        if not (self.relative_speed > 0 and math.isfinite(self.relative_speed)):
            raise ValueError(f"device profile '{self.name}': relative_speed must be a finite "
                             f"number > 0, got {self.relative_speed!r}")


# Memory = what the device can give to training; speeds relative to "workstation".
PRESETS: Mapping[str, DeviceProfile] = MappingProxyType({
    # phone / Jetson-Nano class: little memory, a quarter of the reference compute
    "phone": DeviceProfile("phone", 4 * GIB, 0.25),
    # laptop / small Jetson: the paper's smallest simulated cap (12 GB), half speed
    "laptop": DeviceProfile("laptop", 12 * GIB, 0.5),
    # reference device: the paper's largest simulated cap (32 GB)
    "workstation": DeviceProfile("workstation", 32 * GIB, 1.0),
    # data-centre accelerator (80 GB), twice the reference
    "server": DeviceProfile("server", 80 * GIB, 2.0),
})


@dataclass(frozen=True)
class ExpertCost:
    """Training bytes of ONE trainable expert (method.md: parameter + gradient + optimizer-state +
    activation bytes)."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # AdamW: first and second moment
    activation_bytes: int  # kept for backward, for the expert's share of the batch's tokens

    def __post_init__(self) -> None:
        for field_name in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"ExpertCost.{field_name} must be >= 0")
        if self.total_bytes <= 0:
            raise ValueError("ExpertCost.total_bytes must be > 0")

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def expert_cost(params_per_expert: int, hidden_size: int, intermediate_size: int,
                tokens_per_batch: int, top_k: int, num_experts: int,
                bytes_per_element: int = 4, gated: bool = True) -> ExpertCost:
    """The cost of one trainable expert from plain model and batch numbers.

    Params, gradients and AdamW's two moments: ``params_per_expert`` elements each (moments x2);
    a client holds moments for exactly its C_budget experts with ``budget.optimizer-state =
    "batch"`` (the default; "round" holds them for every expert trained in the round, more).
    Activations: on average tokens_per_batch * top_k / num_experts tokens reach an expert (uniform
    routing); per token it keeps its input (hidden_size) and its intermediate tensors:
    4 * intermediate_size for a gated MLP (gate, up, act(gate), act*up) or 2 * intermediate_size
    for a plain MLP (fc1 output, activation output), as an active expert of ``budget.mode =
    "one-pass"`` does ("recompute" keeps them for one expert at a time, during the backward).
    """
    numbers = {"params_per_expert": params_per_expert, "hidden_size": hidden_size,
               "intermediate_size": intermediate_size, "tokens_per_batch": tokens_per_batch,
               "top_k": top_k, "num_experts": num_experts, "bytes_per_element": bytes_per_element}
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expert_cost: {name} must be an integer >= 1, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"expert_cost: top_k={top_k} exceeds num_experts={num_experts}")
    tensor_bytes = params_per_expert * bytes_per_element
    per_token = hidden_size + (4 if gated else 2) * intermediate_size  # elements
    tokens = tokens_per_batch * top_k / num_experts
    return ExpertCost(param_bytes=tensor_bytes, grad_bytes=tensor_bytes,
                      optimizer_bytes=2 * tensor_bytes,
                      activation_bytes=math.ceil(tokens * per_token * bytes_per_element))


def budget_from_profile(profile: DeviceProfile, cost: ExpertCost, base_bytes: int,
                        total_experts: int, min_budget: int = 1) -> int:
    """C_budget of a device (see the module docstring for the memory and time model).

    ``base_bytes``: training memory that does not grow with C - the frozen weights (including
    the weights of experts not being trained), non-expert trainables with their gradients and
    optimizer state, and the activations outside the routed experts.
    Raises ValueError naming the profile and the bytes needed if ``min_budget`` experts do not fit.
    """
    if total_experts < 1:
        raise ValueError(f"total_experts must be >= 1, got {total_experts}")
    if not 1 <= min_budget <= total_experts:
        raise ValueError(f"min_budget must be in [1, {total_experts}], got {min_budget}")
    if base_bytes < 0:
        raise ValueError(f"base_bytes must be >= 0, got {base_bytes}")
    free = profile.memory_bytes - base_bytes
    by_memory = free // cost.total_bytes if free >= 0 else -1
    if by_memory < min_budget:
        needed = base_bytes + min_budget * cost.total_bytes
        raise ValueError(
            f"device profile '{profile.name}' has {profile.memory_bytes} bytes but training "
            f"{min_budget} expert(s) needs {needed} bytes ({base_bytes} base + {min_budget} x "
            f"{cost.total_bytes} per expert)")
    by_time = total_experts
    if profile.relative_speed < 1.0:
        by_time = math.floor(profile.relative_speed * total_experts + 1e-9)
    return max(min_budget, min(by_memory, by_time, total_experts))


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648, '1.5GB' -> 1500000000, '512' -> 512; ValueError otherwise."""
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"'{text}' is not a size (e.g. 512, 300MB, 2GiB)")
    return round(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_profile(text: str) -> DeviceProfile:
    """``laptop``, ``mem=2GiB:speed=0.5`` or ``laptop:speed=0.4`` -> DeviceProfile."""
    parts = [part.strip() for part in text.split(":")]
    base = PRESETS.get(parts[0].lower()) if parts and "=" not in parts[0] else None
    if base is None and "=" not in parts[0]:
        raise ValueError(f"unknown device profile '{parts[0]}' (presets: {', '.join(PRESETS)})")
    overrides: dict[str, object] = {}
    for part in parts[1:] if base is not None else parts:
        key, sep, value = (piece.strip() for piece in part.partition("="))
        if not sep or key.lower() not in ("mem", "speed"):
            raise ValueError(f"profile '{text}': '{part}' is not mem=SIZE or speed=NUMBER")
        try:
            overrides[key.lower()] = parse_bytes(value) if key.lower() == "mem" else float(value)
        except ValueError as exc:
            raise ValueError(f"profile '{text}': bad {key.lower()} value '{value}'") from exc
    if base is None:
        if "mem" not in overrides:
            raise ValueError(f"profile '{text}' needs mem=SIZE (or a preset name)")
        return DeviceProfile(text, overrides["mem"], overrides.get("speed", 1.0))
    name = text if overrides else base.name
    return replace(base, name=name, memory_bytes=overrides.get("mem", base.memory_bytes),
                   relative_speed=overrides.get("speed", base.relative_speed))


@dataclass(frozen=True)
class ExpertShare:
    """A budget given as a share of all experts ("25%": a quarter of every layer's experts,
    i.e. 2/8 of a layer-equivalent when S = 8)."""

    fraction: float  # in (0, 1]

    def experts(self, total_experts: int) -> int:
        return max(1, min(total_experts, round(self.fraction * total_experts)))


BudgetEntry = int | str | ExpertShare | DeviceProfile  # direct | ALL | share | profile


def parse_budget_entry(entry: str) -> BudgetEntry:
    """One entry of a spec string: an int >= 1, ``ALL``, a share "P%", or a DeviceProfile."""
    entry = entry.strip()
    if not entry:
        raise ValueError("empty entry in budget spec")
    if entry.lower() == ALL:
        return ALL
    if entry.endswith("%"):
        try:
            percent = float(entry[:-1])
        except ValueError:
            raise ValueError(f"'{entry}' is not a percentage") from None
        if not 0 < percent <= 100:
            raise ValueError(f"a share must be in (0%, 100%], got {entry}")
        return ExpertShare(percent / 100)
    if re.fullmatch(r"[+-]?\d+", entry):
        if int(entry) < 1:
            raise ValueError(f"budget must be >= 1, got {entry}")
        return int(entry)
    return parse_profile(entry)


def parse_budget_spec(spec: str) -> tuple[BudgetEntry, ...]:
    """A comma-separated spec -> its entries in order (client i uses entry i % len)."""
    if not str(spec).strip():
        raise ValueError("budget spec is empty")
    try:
        return tuple(parse_budget_entry(entry) for entry in str(spec).split(","))
    except ValueError as exc:
        raise ValueError(f"budget spec '{spec}': {exc}") from exc


def resolve_budget(spec: str, client_id: int, node_spec: str | int | None = None, *,
                   total_experts: int, cost: ExpertCost | None = None, base_bytes: int = 0,
                   min_budget: int = 1, calibration: "Calibration | None" = None) -> int:
    """C_budget(c) of client ``client_id`` - THE function through which budgets are resolved.

    ``spec``: the run's budget string (simulation); ``node_spec``: the SuperNode's node config
    value (deployment) - it wins when present and non-empty. Both use the spec syntax of this
    module; the entry ``client_id % len(entries)`` applies. Profiles go through
    ``calibration`` (hfedmoe.calibration: step time and peak memory measured on the model)
    when given, else through :func:`budget_from_profile`, which needs ``cost`` and
    ``base_bytes``.

    A budget must lie in [``min_budget``, ``total_experts``]: a direct integer above the
    model's experts or any budget below ``min_budget`` (the model's top-k in practice: fewer
    experts cannot hold even one token's routed experts of one layer) raises ValueError - it is
    a mistake in the spec, not something to round silently.
    """
    if client_id < 0:
        raise ValueError(f"client_id must be >= 0, got {client_id}")
    if total_experts < 1:
        raise ValueError(f"total_experts must be >= 1, got {total_experts}")
    chosen = str(node_spec) if node_spec is not None and str(node_spec).strip() else spec
    entries = parse_budget_spec(chosen)
    entry = entries[client_id % len(entries)]
    if entry == ALL:
        return total_experts
    if isinstance(entry, int):
        if entry > total_experts:
            raise ValueError(f"budget {entry} exceeds the model's {total_experts} experts "
                             "(use 'all' or '100%' for every expert)")
        return _at_least(entry, min_budget, f"budget {entry}")
    if isinstance(entry, ExpertShare):
        return _at_least(entry.experts(total_experts), min_budget,
                         f"budget {entry.fraction:.0%} of {total_experts} experts")
    if calibration is not None:
        return calibration.budget_for(entry.memory_bytes, entry.relative_speed, min_budget,
                                      entry.name)
    if cost is None:
        raise ValueError(f"budget spec '{chosen}': device profile '{entry.name}' needs a cost "
                         "model (ExpertCost) to become a budget")
    return budget_from_profile(entry, cost, base_bytes, total_experts, min_budget)


def _at_least(budget: int, min_budget: int, what: str) -> int:
    if budget < min_budget:
        raise ValueError(f"{what} = {budget} is below the minimum of {min_budget} (the model's "
                         "top-k: one token's routed experts of one layer)")
    return budget
