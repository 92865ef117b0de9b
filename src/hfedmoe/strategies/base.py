"""The contract every federated method implements (server side and client side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

from hfedmoe.aggregation import ClientUpdate, State
from hfedmoe.model.adapter import MoEGeometry
from hfedmoe.training import ExpertSelector, LocalTrainingResult


@dataclass(frozen=True)
class ClientPlan:
    """What the server asks of one client in one round."""

    budget_experts: int  # C_budget(c): max experts with a gradient per local batch


class Method(Protocol):
    name: str

    # --- client side ---------------------------------------------------------------
    def selector(self, plan: ClientPlan, geometry: MoEGeometry) -> ExpertSelector | None:
        """Per-batch choice of the experts that learn (None: every routed expert)."""
        ...

    def upload(self, trained: Mapping[str, torch.Tensor], result: LocalTrainingResult) -> State:
        """The tensors a client sends back, chosen from its trainable state ``trained``."""
        ...

    # --- server side ---------------------------------------------------------------
    def aggregate(self, global_state: Mapping[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> State:
        """The next global trainable state from the replies of one round."""
        ...
