"""Flat, family-independent names for the trainable state of an MoE model.

The federation exchanges tensors under three kinds of key, built only here:

* ``expert.<layer>.<expert>.<name>`` - one routed expert's tensor, addressed by (layer, expert)
* ``router.<layer>.<name>``          - one MoE layer's router (gating network)
* ``shared.<name>``                  - any other trainable (non-expert) parameter

Each process builds the same model deterministically, so only trainable tensors travel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from hfedmoe.model.adapter import MoEAdapter

EXPERT, ROUTER, SHARED = "expert", "router", "shared"


@dataclass(frozen=True)
class StateKey:
    kind: str  # EXPERT | ROUTER | SHARED
    name: str  # tensor name inside the expert / router, or the model's parameter name
    layer: int = -1
    expert: int = -1

    def __str__(self) -> str:
        if self.kind == EXPERT:
            return f"{EXPERT}.{self.layer}.{self.expert}.{self.name}"
        if self.kind == ROUTER:
            return f"{ROUTER}.{self.layer}.{self.name}"
        return f"{SHARED}.{self.name}"


def parse_key(key: str) -> StateKey:
    """Inverse of ``str(StateKey)``; raises ValueError naming the key if malformed."""
    kind, _, rest = key.partition(".")
    try:
        if kind == EXPERT:
            layer, expert, name = rest.split(".", 2)
            return StateKey(EXPERT, name, int(layer), int(expert))
        if kind == ROUTER:
            layer, name = rest.split(".", 1)
            return StateKey(ROUTER, name, int(layer))
        if kind == SHARED and rest:
            return StateKey(SHARED, rest)
    except ValueError:
        pass
    raise ValueError(f"malformed state key '{key}'")


def trainable_parameters(adapter: MoEAdapter, scope: str) -> dict[str, torch.nn.Parameter]:
    """Every trainable parameter by flat key: all experts, all routers, non-experts in ``scope``."""
    geometry = adapter.geometry
    params: dict[str, torch.nn.Parameter] = {}
    for layer in range(geometry.num_layers):
        for expert in range(geometry.num_experts):
            for name, p in adapter.expert_parameters(layer, expert).items():
                params[str(StateKey(EXPERT, name, layer, expert))] = p
        for name, p in adapter.router_parameters(layer).items():
            params[str(StateKey(ROUTER, name, layer))] = p
    for name, p in adapter.non_expert_parameters(scope).items():
        params[str(StateKey(SHARED, name))] = p
    return params


def set_trainable(adapter: MoEAdapter, scope: str) -> dict[str, torch.nn.Parameter]:
    """Freeze the whole model, then unfreeze exactly ``trainable_parameters(adapter, scope)``."""
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(adapter, scope)
    for p in params.values():
        p.requires_grad_(True)
    return params


def read_state(params: Mapping[str, torch.nn.Parameter], keys: Iterable[str] | None = None
               ) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of ``params`` (all, or only ``keys``)."""
    chosen = params.keys() if keys is None else keys
    return {k: params[k].detach().to("cpu", torch.float32).clone() for k in chosen}


def write_state(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the live parameters; unknown keys or shape mismatches raise."""
    with torch.no_grad():
        for key, value in state.items():
            if key not in params:
                raise KeyError(f"state key '{key}' is not a trainable parameter of this model")
            target = params[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"state key '{key}': shape {tuple(value.shape)} != model {tuple(target.shape)}"
                )
            target.copy_(value.to(target.device, target.dtype))


def expert_of(key: str) -> tuple[int, int] | None:
    """(layer, expert) of an expert key, else None."""
    parsed = parse_key(key)
    return (parsed.layer, parsed.expert) if parsed.kind == EXPERT else None
