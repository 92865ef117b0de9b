"""Per-expert LoRA inside the expert kernels (``train.adapter = "lora"``).

Each routed expert's projection weights W (out, in) stay frozen; the expert learns its own
low-rank update ΔW = (alpha / r) · B · A with A (r, in) and B (out, r) (Hu et al., 2021, Eq. 3;
B starts at zero, so the model starts as the base model). The update is applied as two thin
matrix products on the expert's tokens, never as a full ΔW:

    y = x Wᵀ + (alpha / r) · (dropout(x) Aᵀ) Bᵀ

so an active expert's backward computes its input gradient through W and the gradients of A and
B (O(tokens · r · (in + out)) FLOPs), not W's gradient (O(tokens · in · out)). Inactive experts
run under ``torch.no_grad`` in the bank as before (hfedmoe.model.sparse_experts): their factors
get no gradient, no optimizer state and no backward work, so a budget of C experts trains C
experts' adapters. The grouped kernels (:func:`grouped_lora_delta`) run the factors of a group
of experts as two more ``grouped_mm`` calls.

Why not peft here: peft 0.21's ``target_parameters`` LoRA for fused experts computes every
expert's delta on every forward and rejects dropout, so it cannot give a budget saving
(docs/lora.md).

Factors are initialised like peft's default (A: Kaiming-uniform with a = √5, B: zeros), from
a generator seeded by (run seed, layer, expert, projection), so that every process of a run
builds the same factors. When factors are attached, they are the expert's only trainable
tensors (hfedmoe.model.generic.ModelAdapter.expert_parameters): the federation exchanges and
aggregates the factors, per expert, and the base weights never travel.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

GROUPED_MM_ALIGNMENT = 16  # bytes: torch's grouped_mm wants row strides that are multiples
LORA_PREFIX = "lora."  # expert parameter names of the factors: "lora.<projection>.A" / ".B"


@dataclass(frozen=True)
class LoRASettings:
    rank: int  # r >= 1
    alpha: float  # the update is scaled by alpha / r
    dropout: float  # on the factors' input, in [0, 1)
    # False (lora.aggregation = "frozen-a"): A stays at its seeded init, the same in every
    # process, and only B trains; averaging B over clients then averages their updates B·A
    # exactly (the plain factor average does not: mean(B)·mean(A) != mean(B·A))
    train_a: bool = True

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRAFactors(nn.Module):
    """ΔW = scaling · B · A for one projection weight of shape (out_features, in_features)."""

    def __init__(self, out_features: int, in_features: int, settings: LoRASettings,
                 generator: torch.Generator, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        a = torch.empty(settings.rank, in_features, dtype=dtype)
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_features))  # kaiming_uniform_(a=sqrt(5))
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, settings.rank, dtype=dtype))  # (out, r)
        self.scaling = settings.scaling
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (t, in) -> (t, out)
        return nn.functional.linear(nn.functional.linear(self.dropout(x), self.A),
                                    self.B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A, (out, in)."""
        return (self.B @ self.A) * self.scaling


def lora_linear(x: torch.Tensor, weight: torch.Tensor, factors: LoRAFactors | None
                ) -> torch.Tensor:
    """x Wᵀ (+ the LoRA update when ``factors`` is given). (t, in) -> (t, out)."""
    out = nn.functional.linear(x, weight)
    return out if factors is None else out + factors(x)


def grouped_lora_delta(x: torch.Tensor, factors: Sequence[LoRAFactors],
                       sizes: "Sequence[int] | torch.Tensor",
                       grouped_linear: Callable) -> torch.Tensor:
    """Row block i of ``x`` (n, in) times ``factors[i]``'s ΔWᵀ, as two grouped products
    (n, r) then (n, out); the experts of a group share settings, so one dropout and one
    scaling serve all. (n, out)."""
    first = factors[0]
    x = first.dropout(x)
    rank = first.A.shape[0]
    if (rank * first.A.element_size()) % GROUPED_MM_ALIGNMENT:
        # grouped_mm needs 16-byte-aligned rows: (n, r) rows of r float32s are not when r is
        # not a multiple of 4; then one pair of products per expert on its rows
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else list(sizes)
        rest = x.shape[0] - sum(sizes)  # rows past the groups (sync-free path): zero delta
        parts = [nn.functional.linear(nn.functional.linear(part, f.A), f.B)
                 for f, part in zip(factors, x.split(sizes + [rest])[:len(sizes)])]
        parts.append(x.new_zeros(rest, first.B.shape[0]))
        return torch.cat(parts) * first.scaling
    hidden = grouped_linear(x, [f.A for f in factors], sizes)  # (n, r)
    return grouped_linear(hidden, [f.B for f in factors], sizes) * first.scaling


def is_trainable_factor(name: str, settings: LoRASettings) -> bool:
    """Whether the expert parameter ``name`` is a factor that trains under ``settings``."""
    return name.startswith(LORA_PREFIX) and (settings.train_a or not name.endswith(".A"))


def factor_seed(seed: int, layer: int, expert: int, projection: str) -> int:
    """A stable per-(run, expert, projection) seed (independent of Python's hash)."""
    return zlib.crc32(f"lora/{seed}/{layer}/{expert}/{projection}".encode())


def attach_factors(expert: nn.Module, settings: LoRASettings, seed: int, layer: int,
                   index: int) -> None:
    """Give ``expert`` (a class with ``lora_targets()``: projection name -> weight (out, in))
    one :class:`LoRAFactors` per projection, in ``expert.lora``; raises ValueError if it
    already has some."""
    if len(expert.lora):
        raise ValueError(f"expert ({layer}, {index}) already has LoRA factors")
    for name, weight in expert.lora_targets().items():
        generator = torch.Generator().manual_seed(factor_seed(seed, layer, index, name))
        expert.lora[name] = LoRAFactors(weight.shape[0], weight.shape[1], settings, generator,
                                        weight.dtype).to(weight.device)


def merged_weights(expert: nn.Module) -> dict[str, torch.Tensor]:
    """W + ΔW for each projection with factors (the expert's exportable weights), detached."""
    targets: Mapping[str, torch.Tensor] = expert.lora_targets()
    return {name: (targets[name] + factors.delta_weight()).detach()
            for name, factors in expert.lora.items()}


def merge_factors(expert: nn.Module) -> None:
    """Fold the factors into the base weights (W ← W + ΔW) and drop them: the expert is then a
    plain expert whose forward equals the LoRA one (dropout off)."""
    merged = merged_weights(expert)
    targets = expert.lora_targets()
    with torch.no_grad():
        for name, value in merged.items():
            targets[name].copy_(value)
    expert.lora.clear()


# --- factors on attention projections (lora.targets = "experts+attention") ---------------

LINEAR_FACTORS = "lora"  # submodule name of an adapted nn.Linear's LoRAFactors


def attention_projections(model: nn.Module, skip: Sequence[nn.Module] = ()) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside an attention module of ``model`` (a module whose class name
    contains "Attention": ``LlamaAttention``'s q/k/v/o_proj, ``BertAttention``'s query, key,
    value and output dense, T5's q/k/v/o, ...), by its name in ``model``, in module order;
    modules inside ``skip`` (expert banks, routers) are left out."""
    skipped = {id(m) for owner in skip for m in owner.modules()}
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__ or id(module) in skipped:
            continue
        for sub_name, sub in module.named_modules():
            if isinstance(sub, nn.Linear) and id(sub) not in skipped:
                found.setdefault(f"{name}.{sub_name}" if name else sub_name, sub)
    return found


def _add_factor_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted nn.Linear: x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ."""
    return output + getattr(module, LINEAR_FACTORS)(inputs[0])


def attach_linear_factors(linear: nn.Linear, name: str, settings: LoRASettings,
                          seed: int) -> torch.utils.hooks.RemovableHandle:
    """Give ``linear`` (weight (out, in), frozen) its own :class:`LoRAFactors` as the submodule
    ``lora`` (parameters ``<name>.lora.A`` / ``.B``), seeded by (``seed``, ``name``) so every
    process builds the same, and a forward hook that adds their update to its output; returns
    the hook's handle (:func:`merge_linear_factors` removes it). Raises ValueError if
    ``linear`` already has factors."""
    if hasattr(linear, LINEAR_FACTORS):
        raise ValueError(f"'{name}' already has LoRA factors")
    generator = torch.Generator().manual_seed(zlib.crc32(f"lora/{seed}/linear/{name}".encode()))
    weight = linear.weight
    linear.add_module(LINEAR_FACTORS, LoRAFactors(weight.shape[0], weight.shape[1], settings,
                                                  generator, weight.dtype).to(weight.device))
    return linear.register_forward_hook(_add_factor_output)


def merge_linear_factors(linear: nn.Linear, hook: torch.utils.hooks.RemovableHandle) -> None:
    """Fold ``linear``'s factors into its weight (W ← W + ΔW), remove ``hook`` and the factors:
    a plain nn.Linear with the same outputs (dropout off)."""
    factors = getattr(linear, LINEAR_FACTORS)
    with torch.no_grad():
        linear.weight.add_(factors.delta_weight().to(linear.weight.dtype))
    hook.remove()
    delattr(linear, LINEAR_FACTORS)
