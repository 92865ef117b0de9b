"""FedAvg (McMahan et al., 2017) over every trainable tensor, weighted by |D_c|.

``fedavg`` / ``fedavg-full``: every client trains every routed expert and uploads all
trainable tensors; client budgets are ignored (reported as such: ``max_active_experts_per_batch``
may exceed them, ``within_budget`` is false) - the unconstrained reference.
``fedavg-drop``: a client whose budget cannot hold full training (budget < all experts) sits
the round out - what happens in practice to weak devices; the others run plain FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import Aggregation, ClientUpdate, State, fedavg_aggregation, fold
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.strategies.base import Diagnostics
from hfedmoe.training import ExpertSelector, LocalTrainingResult


@dataclass(frozen=True)
class FedAvgMethod:
    name: str = "fedavg"  # also registered as "fedavg-full", the unconstrained reference
    drop_constrained: bool = False  # fedavg-drop

    def participates(self, budget_experts: int, geometry: MoEGeometry) -> bool:
        return not self.drop_constrained or budget_experts >= geometry.total_experts

    def selector(self, budget_experts: int, geometry: MoEGeometry, seed: int
                 ) -> ExpertSelector | None:
        return None

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return dict(trained)

    def start_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> Aggregation:
        return fedavg_aggregation(global_state)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> tuple[State, Diagnostics]:
        return fold(self.start_aggregation(global_state), updates)
