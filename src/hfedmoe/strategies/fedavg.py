"""``fedavg``: every client trains every routed expert and uploads all trainable tensors;
the server averages each tensor weighted by |D_c| (McMahan et al., 2017). Budgets are ignored
(every client's budget is all experts)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate, State, fedavg
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.strategies.base import ClientPlan
from hfedmoe.training import ExpertSelector, LocalTrainingResult


class FedAvgMethod:
    name = "fedavg"

    def selector(self, plan: ClientPlan, geometry: MoEGeometry) -> ExpertSelector | None:
        return None

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        return dict(trained)

    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> State:
        return fedavg(global_state, updates)
