"""``fedavg``: every client trains every routed expert and uploads all trainable tensors;
the server averages each tensor weighted by |D_c| (McMahan et al., 2017). Client budgets are
ignored (and reported as such: ``max_active_experts_per_batch`` may exceed them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate, State, fedavg
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.strategies.base import Diagnostics
from hfedmoe.training import ExpertSelector, LocalTrainingResult


@dataclass(frozen=True)
class FedAvgMethod:
    name: str = "fedavg"  # also registered as "fedavg-full", the unconstrained reference

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        return None

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return dict(trained)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        return fedavg(global_state, updates), {}
