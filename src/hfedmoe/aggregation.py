"""Aggregation of sparse client updates (pure: tensors in, tensors out).

A client update is a mapping from flat state keys (see ``hfedmoe.model.state``) to tensors;
it may hold any subset of the global keys. Invariant of every function here: a key that no
client contributes keeps its previous global value - it is never averaged with zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sent back after a local round (decoded, validated)."""

    client_id: int
    num_examples: int  # |D_c|
    state: State  # uploaded tensors only (sparse)
    usage: torch.Tensor  # (L, S) u_c(e), Eq. 16
    metrics: Mapping[str, float]


def weighted_average(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    weight: Callable[[ClientUpdate, str], float],
) -> State:
    """New global state: per key, the ``weight``-weighted mean over clients that sent it.

    ``weight(update, key)`` must be >= 0; a key whose senders all have weight 0 (or that no
    client sent) keeps its global value.
    """
    new_state: State = {}
    for key, current in global_state.items():
        total = torch.zeros_like(current, dtype=torch.float64)
        weight_sum = 0.0
        for update in updates:
            if key not in update.state:
                continue
            w = float(weight(update, key))
            if w > 0:
                total += w * update.state[key].to(torch.float64)
                weight_sum += w
        new_state[key] = (total / weight_sum).to(current.dtype) if weight_sum > 0 else current.clone()
    return new_state


def fedavg(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> State:
    """FedAvg (McMahan et al.): every key averaged with weights |D_c| over its senders."""
    return weighted_average(global_state, updates, lambda update, _key: update.num_examples)
